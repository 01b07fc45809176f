"""I/O bindings for pop3proto: blocking sockets, asyncio, trio, maildrops and the command line."""
