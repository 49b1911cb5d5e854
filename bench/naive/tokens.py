"""Writes a Lua file for wrk.lua: `tokens = {...}`, tokens[N + 1] an HS256 JWT of user u<N>
(sub u<N>, jti jti-<N>, valid for a day). Usage: python tokens.py SECRET_FILE SUBJECTS OUT.lua"""
import sys
import time

import jwt

secret = open(sys.argv[1], "rb").read()
subjects = int(sys.argv[2])
now = int(time.time())
with open(sys.argv[3], "w") as f:
    f.write("tokens = {\n")
    for n in range(subjects):
        t = jwt.encode({"sub": f"u{n}", "jti": f"jti-{n}", "iat": now, "exp": now + 86400}, secret, algorithm="HS256")
        f.write(f'  "{t}",\n')
    f.write("}\n")
