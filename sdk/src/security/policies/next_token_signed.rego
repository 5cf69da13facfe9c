# Client side: the server's token (segment index+1 of the returned path) is
# signed by the key of the server's TLS certificate.
package nsm

default valid := false

valid if {
	token := input.path_segments[input.index + 1].token
	io.jwt.verify_es256(token, input.auth_info.certificate)
}
