#!/usr/bin/env python3
"""Decode the moby.buildkit.trace aux messages of a /build?version=2 JSON stream (stdin)
and print one line per completed vertex: CACHED or RUN, and its name."""
import base64, json, sys

def varint(b, i):
    r = s = 0
    while True:
        c = b[i]; i += 1
        r |= (c & 0x7f) << s; s += 7
        if c < 0x80: return r, i

def fields(b):
    i = 0
    while i < len(b):
        k, i = varint(b, i); f, t = k >> 3, k & 7
        if t == 0: v, i = varint(b, i)
        elif t == 2:
            n, i = varint(b, i); v = b[i:i+n]; i += n
        elif t == 1: v = b[i:i+8]; i += 8
        elif t == 5: v = b[i:i+4]; i += 4
        else: raise ValueError(t)
        yield f, v

seen = {}
errors = []
for line in sys.stdin:
    line = line.strip()
    if not line: continue
    for part in line.replace('}{', '}\n{').split('\n'):
        m = json.loads(part)
        if m.get('errorDetail'): errors.append(m['errorDetail'].get('message'))
        if m.get('id') != 'moby.buildkit.trace': 
            if 'aux' in m: print('AUX', m['aux'], file=sys.stderr)
            continue
        raw = base64.b64decode(m['aux'])
        for f, v in fields(raw):
            if f != 1: continue
            d = {'cached': False, 'completed': False}
            for ff, vv in fields(v):
                if ff == 1: d['digest'] = vv.decode()
                elif ff == 3: d['name'] = vv.decode()
                elif ff == 4: d['cached'] = bool(vv)
                elif ff == 6: d['completed'] = True
                elif ff == 7: d['error'] = vv.decode()
            s = seen.setdefault(d['digest'], {'name': d.get('name', ''), 'cached': False, 'completed': False})
            s['cached'] |= d['cached']; s['completed'] |= d['completed']
            if d.get('name'): s['name'] = d['name']
import re
steps = hits = 0
for dg, s in seen.items():
    print('CACHED' if s['cached'] else ('RUN   ' if s['completed'] else 'INCOMPLETE'), s['name'], file=sys.stderr)
    if re.match(r'^\[[^\]]*\d+/\d+\] ', s['name']) and ' FROM ' not in s['name']:
        steps += 1
        hits += s['cached']
for e in errors: print('ERROR', e, file=sys.stderr)
print(f'STEPS {steps} CACHED {hits}' + (' ERROR' if errors else ''))
