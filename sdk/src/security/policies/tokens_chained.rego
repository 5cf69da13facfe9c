# The tokens form a chain: hop x addressed its token to hop x+1, so the
# audience of segment x contains the subject of segment x+1, for every
# adjacent pair. Fewer than two segments are trivially chained.
package nsm

default valid := false

segments := object.get(input, "path_segments", [])

# Each token's claims, decoded once, in path order (a token that does not
# decode is missing here, which the count check below refuses).
payloads := [p | some seg in segments; [_, p, _] := io.jwt.decode(seg.token)]

# `aud` may be a single string (RFC 7519) or an array.
audiences(payload) := payload.aud if is_array(payload.aud)

audiences(payload) := [payload.aud] if is_string(payload.aud)

valid if count(segments) < 2

valid if {
	count(segments) >= 2
	count(payloads) == count(segments)
	every x in numbers.range(0, count(segments) - 2) {
		payloads[x + 1].sub in audiences(payloads[x])
	}
}
