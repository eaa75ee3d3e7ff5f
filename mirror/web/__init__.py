"""What every HTTP surface of the node shares (the registry API, the admin and debug
listener, access control, the access log): the typed application and request keys,
the client and base URL as seen through trusted proxies, and capped body reads.

It sits below all of them, so none of them has to import another to reach these.
"""
