"""TLS: contexts for HTTPS listeners and https:// backends (``contexts``), certificate facts
(``certs``) and a ClientHello reader for SNI routing without decryption (``clienthello``)."""
