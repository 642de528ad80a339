/**
 * The server against real NBD clients: libnbd (nbdinfo, nbdcopy, python bindings), qemu and fio.
 * A test skips only when its tool is not installed.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { haveTool, havePythonNbd, needTools, run, runPython, startServer } from './helpers.js';
import { ioError } from './memory-device.js';

const MiB = 1024 * 1024;

const needTool = needTools;

async function needPython(t: TestContext): Promise<boolean> {
  if (!(await havePythonNbd())) {
    t.skip('python3-libnbd is not installed for /usr/bin/python3');
    return false;
  }
  return true;
}

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-nbd-'));
}

test('nbdinfo --json reports size, flags and block sizes', async (t) => {
  if (!(await needTool(t, 'nbdinfo'))) return;
  const srv = await startServer(64 * MiB, { description: 'test disk', maxBlock: 16 * MiB });
  try {
    const r = await run('nbdinfo', ['--json', srv.uri]);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout);
    assert.equal(info.protocol, 'newstyle-fixed');
    assert.equal(info.structured, true);
    const exp = info.exports[0];
    assert.equal(exp['export-size'], 64 * MiB);
    assert.equal(exp.is_read_only, false);
    assert.equal(exp.can_flush, true);
    assert.equal(exp.can_fua, true);
    assert.equal(exp.can_trim, true);
    assert.equal(exp.can_zero, true);
    assert.equal(exp.can_multi_conn, true);
    assert.equal(exp.can_df, true);
    assert.equal(exp.can_fast_zero, false);
    assert.equal(exp.block_size_minimum, 512);
    assert.equal(exp.block_size_preferred, 4096);
    assert.equal(exp.block_size_maximum, 16 * MiB);
    assert.equal(exp.description, 'test disk');
  } finally {
    await srv.close();
  }
});

test('nbdinfo --list lists the named export with its description', async (t) => {
  if (!(await needTool(t, 'nbdinfo'))) return;
  const srv = await startServer(8 * MiB, { exportName: 'pcache0', description: 'cached disk' });
  try {
    const r = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout);
    assert.equal(info.exports.length, 1);
    assert.equal(info.exports[0]['export-name'], 'pcache0');
    assert.equal(info.exports[0].description, 'cached disk');
    assert.equal(info.exports[0]['export-size'], 8 * MiB);

    const plain = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}`]);
    assert.equal(plain.code, 0, plain.stderr);
    assert.match(plain.stdout, /export="pcache0"/);

    // An unknown name is refused (NBD_REP_ERR_UNKNOWN), the real one works.
    const bad = await run('nbdinfo', [`nbd://127.0.0.1:${srv.port}/nope`]);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /unknown|not available|export/i);
    const good = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${srv.port}/pcache0`]);
    assert.equal(good.code, 0, good.stderr);
    assert.equal(good.stdout.trim(), String(8 * MiB));
  } finally {
    await srv.close();
  }
});

test('qemu-io writes and reads back patterns, including the last 512 bytes', async (t) => {
  if (!(await needTool(t, 'qemu-io'))) return;
  const size = 32 * MiB;
  const srv = await startServer(size);
  try {
    const last = size - 512;
    const r = await run('qemu-io', [
      '-f', 'raw', srv.uri,
      '-c', 'write -P 0xab 0 64k',
      '-c', 'read -P 0xab 0 64k',
      '-c', `write -P 0xcd ${last} 512`,
      '-c', `read -P 0xcd ${last} 512`,
      '-c', 'write -P 0x11 1M 1M',
      '-c', 'write -z 1M 4k',
      '-c', 'read -P 0 1M 4k',
      '-c', 'read -P 0x11 1052672 1044480',
      '-c', 'discard 2M 64k',
      '-c', 'flush',
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i);
    assert.equal(r.stdout.match(/^read /gm)?.length, 4, r.stdout);
    assert.ok(srv.device.data.subarray(0, 64 * 1024).every((b) => b === 0xab));
    assert.ok(srv.device.data.subarray(last).every((b) => b === 0xcd));
    assert.ok(srv.device.calls.flush >= 1);

    // Reading past the end is refused by qemu itself; the request must not reach the device.
    const past = await run('qemu-io', ['-f', 'raw', srv.uri, '-c', `read ${size} 512`]);
    assert.match(past.stdout + past.stderr, /out of range|Input\/output|Invalid/i);
  } finally {
    await srv.close();
  }
});

test('libnbd with strict mode off: a read crossing the end fails and the connection goes on', async (t) => {
  if (!(await needPython(t))) return;
  const size = 4 * MiB;
  const srv = await startServer(size);
  srv.device.data.fill(0x5a, 0, 4096);
  try {
    const script = `
import sys, nbd
size = int(sys.argv[2])
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(sys.argv[1])
    assert h.get_structured_replies_negotiated() == structured
    h.set_strict_mode(0)
    for (n, off) in ((512, size - 256), (1024, size - 512), (512, size)):
        try:
            h.pread(n, off)
            print("no error for", n, off)
            sys.exit(1)
        except nbd.Error as e:
            assert e.errnum == 22, e
    # out-of-range write is ENOSPC, unaligned write is EINVAL
    try:
        h.pwrite(b"x" * 512, size)
        sys.exit(2)
    except nbd.Error as e:
        assert e.errnum == 28, e
    try:
        h.pwrite(b"x" * 100, 0)
        sys.exit(3)
    except nbd.Error as e:
        assert e.errnum == 22, e
    # the same connection still works
    assert h.pread(4096, 0) == b"\\x5a" * 4096
    h.pwrite(b"\\x77" * 512, size - 512)
    assert h.pread(512, size - 512) == b"\\x77" * 512
    h.shutdown()
print("ok")
`;
    const r = await runPython(script, [srv.uri, String(size)]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.stdout.trim(), 'ok');
    assert.ok(srv.server.stats().errors >= 10);
  } finally {
    await srv.close();
  }
});

test('read errors reach the client, with and without structured replies', async (t) => {
  if (!(await needPython(t))) return;
  const srv = await startServer(4 * MiB);
  srv.device.data.fill(0x42);
  srv.device.faults.read = (offset, length) =>
    offset < 1 * MiB + 4096 && offset + length > 1 * MiB ? ioError('bad sector') : undefined;
  try {
    const script = `
import sys, nbd
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(sys.argv[1])
    assert h.get_structured_replies_negotiated() == structured
    try:
        h.pread(8192, 1024 * 1024)
        print("read of the bad range succeeded")
        sys.exit(1)
    except nbd.Error as e:
        assert e.errnum == 5, e
    # neighbouring data is fine, on the same connection
    assert h.pread(4096, 0) == b"\\x42" * 4096
    assert h.pread(4096, 1024 * 1024 + 4096) == b"\\x42" * 4096
    h.shutdown()
print("ok")
`;
    const r = await runPython(script, [srv.uri]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.stdout.trim(), 'ok');
    assert.equal(srv.server.stats().deviceErrors, 2);
  } finally {
    await srv.close();
  }
});

test('nbdcopy of 64 MiB of random data in and out keeps the sha256', async (t) => {
  if (!(await needTool(t, 'nbdcopy'))) return;
  const size = 64 * MiB;
  const dir = tmpDir();
  const srv = await startServer(size);
  try {
    const src = path.join(dir, 'in.img');
    const dst = path.join(dir, 'out.img');
    const data = randomBytes(size);
    // A zero run so nbdcopy also exercises its zeroing path.
    data.fill(0, 8 * MiB, 12 * MiB);
    fs.writeFileSync(src, data);
    const want = createHash('sha256').update(data).digest('hex');

    const up = await run('nbdcopy', [src, srv.uri], { timeoutMs: 60_000 });
    assert.equal(up.code, 0, up.stderr);
    assert.equal(createHash('sha256').update(srv.device.data).digest('hex'), want);

    const down = await run('nbdcopy', [srv.uri, dst], { timeoutMs: 60_000 });
    assert.equal(down.code, 0, down.stderr);
    assert.equal(createHash('sha256').update(fs.readFileSync(dst)).digest('hex'), want);
    const st = srv.server.stats();
    assert.ok(st.requests.write > 0 && st.requests.read > 0);
    assert.ok(st.connectionsTotal >= 2);
  } finally {
    await srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('fio randwrite with crc32c verify over 4 connections', async (t) => {
  if (!(await needTool(t, 'fio'))) return;
  const srv = await startServer(128 * MiB);
  try {
    const r = await run(
      'fio',
      [
        '--name=nbdverify',
        '--ioengine=nbd',
        `--uri=${srv.uri}`,
        '--verify_state_save=0',
        '--rw=randwrite',
        '--bs=4k',
        '--verify=crc32c',
        '--numjobs=4',
        '--iodepth=8',
        '--size=32m',
        // each job gets its own 32 MiB slice so the jobs do not overwrite each other's blocks
        '--offset_increment=32m',
        '--group_reporting',
      ],
      { timeoutMs: 60_000 },
    );
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /verify: bad|crc32c: verify failed|err=\s*[1-9]/);
    assert.match(r.stdout, /err= 0/);
    const st = srv.server.stats();
    assert.ok(st.connectionsTotal >= 4, `connections ${st.connectionsTotal}`);
    assert.ok(st.requests.write >= 4 * 8192, `writes ${st.requests.write}`);
    assert.ok(st.requests.read >= 4 * 8192, `reads ${st.requests.read}`);
    assert.equal(st.errors, 0);
  } finally {
    await srv.close();
  }
});
