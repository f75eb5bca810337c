"""HTTP/2: towards clients (listen.py chooses the protocol of a connection, front.py serves
it, convert.py translates messages, engine.py frames them) and towards backends
(upstream.py: multiplexed connections for upstreams with ``protocol`` h2 or grpc)."""
