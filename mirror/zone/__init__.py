"""A zone of nodes: each blob crosses the link once zone-wide, whatever node a client reaches.

See README "Zone". Pieces: `settings` (mirror.zone), `membership` (who is
in, who is down), `rendezvous` (the owner of a digest), `signing` (HMAC of
node-to-node requests), `peers` (the client side: a peer as a blob source),
`server` (the `/zone/v1/` interface), `routing` (the hook the blob and
manifest services call), `relay` (a non-owner's verified pass-through).
"""
