# No token on the path has expired: every token's `exp` (unix seconds) is
# later than now. A path without segments is valid.
package nsm

default valid := false

segments := object.get(input, "path_segments", [])

valid if {
	now := time.now_ns() / 1000000000
	every seg in segments {
		[_, payload, _] := io.jwt.decode(seg.token)
		payload.exp > now
	}
}
