"""Registry authentication: distribution-compatible token and htpasswd auth.

Modules: :mod:`.access` (resources and actions), :mod:`.challenge` (the
`WWW-Authenticate` value), :mod:`.keys` and :mod:`.token` (local JWT
validation), :mod:`.controller` (per-request access control), :mod:`.forward`
(upstream judges), :mod:`.relay` (the `/token` relay), :mod:`.htpasswd`.
Nothing is imported here, so a node without token auth never loads the
crypto libraries.
"""
