#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/).

    tests/fuzz/make-seeds.py [QEMU_BINARY]

The QMP seeds are built around what a real QEMU says: the script starts
one (no guest, -S) and records its greeting, query-qmp-schema (pruned to
the types the library looks at, so the seed stays small), query-block and
an HMP reply.  The records follow what engine-qemu.c and engine-pve.c
write.  Seeds are inputs to start from, not expected outputs: regenerate
them freely when the protocol or the record changes.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QMP_DIR = os.path.join(HERE, 'corpus', 'qmp')
REC_DIR = os.path.join(HERE, 'corpus', 'record')
KEEP_DRIVERS = {'copy-before-write', 'snapshot-access', 'file', 'raw', 'qcow2', 'nbd'}


def real_qemu(binary):
    tmp = tempfile.mkdtemp(prefix='fleece-seeds-')
    try:
        disk = os.path.join(tmp, 'd.qcow2')
        sock = os.path.join(tmp, 'q.sock')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', disk, '1M'], check=True)
        qemu = subprocess.Popen([binary, '-machine', 'q35', '-accel', 'tcg', '-S', '-nodefaults',
                                 '-display', 'none', '-qmp', 'unix:%s,server=on,wait=off' % sock,
                                 '-drive', 'file=%s,if=none,id=drive-scsi0,format=qcow2' % disk,
                                 '-device', 'virtio-scsi-pci,id=scsihw0',
                                 '-device', 'scsi-hd,bus=scsihw0.0,drive=drive-scsi0,id=scsi0'],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        f = s.makefile('rwb')

        def read():
            while True:
                m = json.loads(f.readline())
                if 'event' not in m:
                    return m

        def cmd(c, **a):
            f.write((json.dumps({'execute': c, 'arguments': a, 'id': 'x'}) + '\n').encode())
            f.flush()
            return read()

        greeting = read()
        cmd('qmp_capabilities')
        schema = cmd('query-qmp-schema')['return']
        blocks = cmd('query-block')['return']
        hmp = cmd('human-monitor-command', **{'command-line': 'info block'})['return']
        cmd('quit')
        qemu.wait(10)
        return greeting, schema, blocks, hmp
    finally:
        shutil.rmtree(tmp)


def prune(schema):
    """The entities reachable from the commands the library uses, with
    BlockdevOptions cut down to a few drivers and deep types flattened."""
    by = {e['name']: e for e in schema}
    out = {}

    def refs(e):
        r = [e[k] for k in ('arg-type', 'ret-type', 'element-type') if k in e]
        r += [m['type'] for m in e.get('members', []) if 'type' in m]
        r += [v['type'] for v in e.get('variants', [])]
        return r

    def add(name, depth):
        if name in out or name not in by:
            return
        e = dict(by[name])
        if e.get('meta-type') == 'object' and any(v['case'] == 'copy-before-write'
                                                  for v in e.get('variants', [])):
            e['variants'] = [v for v in e['variants'] if v['case'] in KEEP_DRIVERS]
        if depth > 3 and e.get('meta-type') == 'object':
            e['members'] = [dict(m, type='str') for m in e.get('members', [])]
            e.pop('variants', None)
        out[name] = e
        for r in refs(e):
            add(r, depth + 1)

    for c in ('blockdev-add', 'blockdev-backup', 'query-block', 'qom-set', 'transaction'):
        add(c, 0)
    for n in ('str', 'int', 'bool', 'any', 'null', 'number'):
        add(n, 0)
    return list(out.values())


def j(o):
    return json.dumps(o, separators=(', ', ': '))


def write(d, name, data):
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def qmp_seeds(greeting, schema, blocks, hmp):
    g = j(greeting) + '\r\n'
    cap = '{"return": {}, "id": "fleece-1"}\r\n'
    sch = j({'return': schema, 'id': 'fleece-2'}) + '\r\n'
    qb = j({'return': blocks, 'id': 'fleece-3'}) + '\r\n'
    hm = j({'return': hmp, 'id': 'fleece-4'}) + '\r\n'
    gf = '{"return": {}, "id": "fleece-5"}\r\n'
    ev = ('{"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": '
          '"JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "fleece-scsi0"}}\r\n')
    write(QMP_DIR, 'full', g + cap + sch + ev + qb + ev + hm + gf)
    write(QMP_DIR, 'getfd-refused', g + cap + sch + qb + hm +
          '{"error": {"class": "GenericError", "desc": "No file descriptor supplied via '
          'SCM_RIGHTS"}, "id": "fleece-5"}\r\n')
    write(QMP_DIR, 'greeting-only', g)
    write(QMP_DIR, 'no-greeting', cap + qb)
    write(QMP_DIR, 'error-replies', g + cap +
          '{"error": {"class": "CommandNotFound", "desc": "The command query-qmp-schema '
          'has not been found"}, "id": "fleece-2"}\r\n'
          '{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'
          '{"error": {"class": 7}, "id": "fleece-4"}\r\n')
    write(QMP_DIR, 'capabilities-refused', g +
          '{"error": {"class": "GenericError", "desc": "Capabilities negotiation is already '
          'complete, command ignored"}, "id": "fleece-1"}\r\n')
    write(QMP_DIR, 'wrong-ids', g + '{"return": {}, "id": "fleece-0"}\r\n'
          '{"return": {}, "id": 1}\r\n{"return": {}, "id": ["fleece-1"]}\r\n' + cap +
          '{"return": [], "id": "fleece-3"}\r\n' + sch + qb + hm)
    write(QMP_DIR, 'unicode', g + cap + sch + qb +
          '{"return": "caf\\u00e9 \xe2\x82\xac \\ud83d\\ude00 \\udc00 \xff\xfe", "id": "fleece-4"}\r\n')
    deep = '[' * 300 + ']' * 300
    write(QMP_DIR, 'deep', g + cap + sch + '{"return": %s, "id": "fleece-3"}\r\n' % deep)
    write(QMP_DIR, 'numbers', g + cap + sch +
          '{"return": [{"device": "d", "inserted": {"image": {"virtual-size": '
          '18446744073709551616}, "node-name": "n"}, "x": [1e400, -0, -1e-400, 0.1, '
          '-9223372036854775809]}], "id": "fleece-3"}\r\n')
    write(QMP_DIR, 'framing', g.rstrip() + ' ' + cap.rstrip() + '\n\n\r\n   \t' + sch.rstrip() +
          qb.rstrip() + '\n' + hm)
    write(QMP_DIR, 'null-return', g + cap + '{"return": null, "id": "fleece-2"}\r\n'
          '{"return": null, "id": "fleece-3"}\r\n{"return": 5, "id": "fleece-4"}\r\n')
    cyc = [
        {'name': 'blockdev-add', 'meta-type': 'command', 'arg-type': 'A', 'ret-type': 'B'},
        {'name': 'A', 'meta-type': 'object', 'members': [{'name': 'driver', 'type': 'E'},
                                                           {'name': 'a', 'type': 'A'}],
         'tag': 'driver', 'variants': [{'case': 'copy-before-write', 'type': 'A'}]},
        {'name': 'E', 'meta-type': 'enum', 'values': ['copy-before-write'],
         'members': [{'name': 'copy-before-write'}]},
        {'name': 'blockdev-backup', 'meta-type': 'command', 'arg-type': 'C', 'ret-type': 'B'},
        {'name': 'C', 'meta-type': 'object', 'members': [{'name': 'x-perf', 'type': 'D'}]},
        {'name': 'D', 'meta-type': 'alternate', 'members': [{'type': 'D'}, {'type': 'C'}]},
        {'name': 'B', 'meta-type': 'array', 'element-type': 'B'},
    ]
    write(QMP_DIR, 'schema-cycles', g + cap + j({'return': cyc, 'id': 'fleece-2'}) + '\r\n')
    odd = [
        {'name': 'blockdev-add', 'meta-type': 'command', 'arg-type': 5},
        {'name': 5, 'meta-type': 'object', 'members': 'x', 'variants': {}},
        {'name': 'blockdev-backup', 'meta-type': 'command', 'arg-type': 'missing'},
        {'meta-type': 'enum'}, 'str', None, [],
        {'name': 'q', 'meta-type': 'object', 'members': [5, None, {'name': 3, 'type': []}],
         'variants': [None, {'case': 1}, {'case': 'copy-before-write', 'type': 'q'}]},
    ]
    write(QMP_DIR, 'schema-odd', g + cap + j({'return': odd, 'id': 'fleece-2'}) + '\r\n')
    write(QMP_DIR, 'schema-not-array', g + cap + '{"return": {"name": "x"}, "id": "fleece-2"}\r\n')
    flood = ''.join('{"event": "E%d", "data": {"n": %d}}\n' % (i % 7, i) for i in range(1100))
    write(QMP_DIR, 'event-flood', g + cap + flood + sch + qb + hm)
    write(QMP_DIR, 'oversize', g + cap + '{"return": "' + 'x' * 70000 + '", "id": "fleece-2"}\r\n')
    write(QMP_DIR, 'not-object', g + cap + '[1, 2, 3]\r\n')
    write(QMP_DIR, 'garbage', g + 'QEMU? {"return": {}, "id": "fleece-1"}\r\n')
    write(QMP_DIR, 'truncated', g + cap + sch[:len(sch) // 2])
    write(QMP_DIR, 'odd-events', g + cap + '{"event": 42}\r\n{"event": "X", "data": 1}\r\n'
          '{"event": "Y", "data": null}\r\n' + sch)


RUN = '2f7c0ee8-5d3c-4b43-a7a1-9f8a5f1e1e11'


def drive(key, size, fleeced, image=None, fmt=None, **over):
    d = {'key': key, 'size': size, 'fleeced': fleeced, 'device': 'drive-' + key,
         'qdev': '/machine/peripheral/' + key, 'root': '#block314', 'image': image,
         'format': fmt, 'pending': None, 'volid': image, 'target-file': None}
    if fleeced:
        d['identity'] = {'dev': 65024, 'ino': 11003461}
        d['unformatted'] = True
    d.update(over)
    return d


def rec(**over):
    """A record as lifecycle.c and engine-qemu.c write it (version 2)."""
    r = {'version': 2, 'vmid': 100, 'engine': 'qemu', 'run': RUN,
         'qmp': '/run/qemu-server/100.qmp', 'state': 'attached', 'created': 1700000000,
         'pid': 4242, 'storage': {'type': 'dir', 'dir': '/var/lib/vz/fleece',
                                  'dev': 65024, 'ino': 11002043},
         'bitmap': None, 'bitmap-mode': None,
         'drives': [drive('efidisk0', 540672, False),
                    drive('scsi0', 16777216, True, 'vm-100-fleece-0.qcow2', 'qcow2')],
         'paused-by-us': False}
    r.update(over)
    return json.dumps(r, indent=3) + '\n'


def record_seeds():
    target_file = {'dir': '/backup/100', 'name': 'scsi0.raw', 'pending': None,
                   'identity': {'dev': 65024, 'ino': 11002035}}
    write(REC_DIR, 'qemu-attached', rec())
    # Write-ahead: the planned names before the image exists.
    write(REC_DIR, 'qemu-attaching', rec(state='attaching', drives=[
        drive('scsi0', 16777216, True, 'vm-100-fleece-0.qcow2', 'qcow2', volid=None,
              pending='.vm-100-fleece-0.qcow2.2f7c0ee8.new', identity=None)]))
    write(REC_DIR, 'qemu-starting-paused', rec(
        state='starting', **{'paused-by-us': True},
        target={'type': 'dir', 'dir': '/backup/100', 'format': 'raw'},
        drives=[drive('scsi0', 16777216, True, 'vm-100-fleece-0.qcow2', 'qcow2',
                      **{'target-file': dict(target_file, pending='.scsi0.raw.2f7c0ee8.new',
                                             identity=None)})]))
    write(REC_DIR, 'qemu-running-bitmap', rec(
        state='running', bitmap='b0', **{'bitmap-mode': 'use', 'bitmap-node': 'n',
                                          'bitmap-existed': True},
        target={'type': 'nbd', 'uri': 'nbd://h/'}))
    write(REC_DIR, 'qemu-running-dir-target', rec(
        state='running', target={'type': 'dir', 'dir': '/backup/100', 'format': 'raw'},
        drives=[drive('scsi0', 16777216, True, 'vm-100-fleece-0.qcow2', 'qcow2',
                      **{'target-file': target_file})]))
    write(REC_DIR, 'qemu-succeeded', rec(state='succeeded'))
    write(REC_DIR, 'callback-storage', rec(
        storage={'type': 'callback', 'id': 'pve:local-lvm', 'flags': 3},
        drives=[drive('scsi0', 16777216, True, 'vm-100-fleece-0', 'raw',
                      volid='local-lvm:vm-100-fleece-0', identity='local-lvm:vm-100-fleece-0')]))
    write(REC_DIR, 'rbd-storage', rec(
        storage={'type': 'rbd', 'pool': 'rbd', 'namespace': None},
        drives=[drive('scsi0', 16777216, True, 'vm-100-fleece-0', 'raw',
                      volid='vm-100-fleece-0', identity={'rbd-id': '1f2e3d'})]))
    write(REC_DIR, 'pve', json.dumps({
        'version': 2, 'vmid': 100, 'engine': 'pve', 'run': RUN, 'qmp': '/run/q.qmp',
        'state': 'running', 'created': 1, 'pid': 1,
        'storage': {'type': 'dir', 'dir': '/s', 'dev': 1, 'ino': 2},
        'attach': 'blockdev', 'mode': 'pbs', 'target-id': None, 'backup-uuid': 'u',
        'drives': [drive('scsi0', 4096, True, 'vm-100-fleece-0.raw', 'raw')]}))
    write(REC_DIR, 'drives-not-array', rec(drives='scsi0'))
    write(REC_DIR, 'drive-entries-odd', rec(drives=[
        None, 1, 'x', [], {'key': 5, 'fleeced': 'yes', 'volid': 7, 'identity': 'x',
                           'pending': '../x', 'target-file': {'dir': 'rel', 'name': '..'}}]))
    write(REC_DIR, 'no-drives', json.dumps({'version': 2, 'vmid': 100, 'engine': 'qemu'}))
    write(REC_DIR, 'version-1', rec(version=1))
    write(REC_DIR, 'other-vm', rec(vmid=101))
    write(REC_DIR, 'truncated', rec()[:200])
    write(REC_DIR, 'storage-odd', rec(storage={'type': 'dir', 'dir': ['x'], 'dev': 'a'}))


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else 'qemu-system-x86_64'
    for d in (QMP_DIR, REC_DIR):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
    greeting, schema, blocks, hmp = real_qemu(binary)
    qmp_seeds(greeting, prune(schema), blocks, hmp)
    record_seeds()


if __name__ == '__main__':
    main()
