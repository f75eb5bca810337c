"""HTTP/1.1 front door: client protocol, upstream protocol, header rules."""
