# Server side: the caller's token (segment index-1) is signed by the key of
# the TLS peer certificate, i.e. the caller is who its token says it is.
package nsm

default valid := false

valid if {
	input.index > 0
	token := input.path_segments[input.index - 1].token
	io.jwt.verify_es256(token, input.auth_info.certificate)
}
