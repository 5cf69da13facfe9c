# Every path segment carries a token that parses as a JWT (three base64url
# segments of JSON). A path without segments is valid.
package nsm

default valid := false

segments := object.get(input, "path_segments", [])

valid if {
	every seg in segments {
		io.jwt.decode(seg.token)
	}
}
