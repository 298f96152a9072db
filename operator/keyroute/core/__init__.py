"""The pure core: data in, decisions out. Nothing here opens a socket, a file or reads the clock."""
