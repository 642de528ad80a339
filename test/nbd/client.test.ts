/** The NBD client against nbdkit (a reference server) and against our own server. */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connectNbd, listNbdExports, parseNbdUri, type NbdClient } from '../../src/nbd/client.js';
import * as P from '../../src/nbd/protocol.js';
import { createNbdServer } from '../../src/nbd/server.js';
import { haveTool, run, startServer } from './helpers.js';
import { ioError } from './memory-device.js';

const MiB = 1024 * 1024;

test('parseNbdUri', () => {
  assert.deepEqual(parseNbdUri('nbd://127.0.0.1:1234/disk'), { transport: 'tcp', host: '127.0.0.1', port: 1234, exportName: 'disk' });
  assert.deepEqual(parseNbdUri('nbd://example.org'), { transport: 'tcp', host: 'example.org', port: 10809, exportName: '' });
  assert.deepEqual(parseNbdUri('nbd://[::1]:99/a%20b'), { transport: 'tcp', host: '::1', port: 99, exportName: 'a b' });
  assert.deepEqual(parseNbdUri('nbd+unix:///exp?socket=/tmp/s.sock'), { transport: 'unix', path: '/tmp/s.sock', exportName: 'exp' });
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/run/x'), { transport: 'unix', path: '/run/x', exportName: '' });
  assert.throws(() => parseNbdUri('nbd+unix:///exp'), /socket=/);
  assert.deepEqual(parseNbdUri('nbds://alice@h:7/e?tls-psk-file=/k.psk'), {
    transport: 'tcp', host: 'h', port: 7, exportName: 'e', tls: { pskFile: '/k.psk', username: 'alice' },
  });
  assert.deepEqual(parseNbdUri('nbds+unix:///e?socket=/s&tls-psk-file=/k&tls-username=bob'), {
    transport: 'unix', path: '/s', exportName: 'e', tls: { pskFile: '/k', username: 'bob' },
  });
  assert.deepEqual(parseNbdUri('nbds://h/?tls-certificates=/pki&tls-verify-peer=false'), {
    transport: 'tcp', host: 'h', port: 10809, exportName: '', tls: { certificatesDir: '/pki', verifyPeer: false },
  });
  assert.deepEqual(parseNbdUri('nbds+unix://carol@/e?socket=/s&tls-psk-file=/k'), {
    transport: 'unix', path: '/s', exportName: 'e', tls: { pskFile: '/k', username: 'carol' },
  });
  assert.deepEqual(parseNbdUri('nbds://h/'), { transport: 'tcp', host: 'h', port: 10809, exportName: '', tls: {} });
  assert.throws(() => parseNbdUri('nbd://h/?tls-psk-file=/k'), /nbds:\/\//);
  assert.throws(() => parseNbdUri('nbds://h/?tls-psk-file=/k&tls-certificates=/d'), /exclude/);
  assert.throws(() => parseNbdUri('nbds://h/?tls-verify-peer=maybe'), /boolean/);
  assert.throws(() => parseNbdUri('nbds+unix:///e'), /socket=/);
  assert.throws(() => parseNbdUri('http://h/e'), /not an NBD URI/);
  assert.throws(() => parseNbdUri('nonsense'), /invalid NBD URI/);
});

interface Nbdkit {
  sock: string;
  uri: string;
  errorFile: string;
  stop(): Promise<void>;
}

/** nbdkit memory on a unix socket, with the error filter armed while errorFile exists. */
async function startNbdkit(size: string): Promise<Nbdkit> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-nbdkit-'));
  const sock = path.join(dir, 'nbdkit.sock');
  const errorFile = path.join(dir, 'fail-reads');
  // nbdkit writes its pid file once it listens; the socket file alone appears a moment earlier.
  const pidFile = path.join(dir, 'nbdkit.pid');
  const child: ChildProcess = spawn(
    'nbdkit',
    ['-f', '--exit-with-parent', '-P', pidFile, '-U', sock, '--filter=error', 'memory', size, 'error-pread=EIO', 'error-pread-rate=1', `error-pread-file=${errorFile}`],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  for (let i = 0; !fs.existsSync(pidFile); i++) {
    if (i > 200 || child.exitCode !== null) throw new Error(`nbdkit did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    sock,
    uri: `nbd+unix:///?socket=${sock}`,
    errorFile,
    async stop() {
      child.kill('SIGTERM');
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** What every server must do for the client; `failReads` arms the server's read fault. */
async function exercise(c: NbdClient, failReads: (on: boolean) => void): Promise<void> {
  assert.ok(c.canFlush && c.canFua && c.canTrim && c.canWriteZeroes && c.canMultiConn);
  assert.equal(c.readOnly, false);

  // Many writes in flight at once, each with distinct data; then read everything back at once.
  const blocks = Array.from({ length: 128 }, () => randomBytes(64 * 1024));
  await Promise.all(blocks.map((b, i) => c.write(i * 65536, b)));
  const back = await Promise.all(blocks.map((_, i) => c.read(i * 65536, 65536)));
  back.forEach((b, i) => assert.ok(b.equals(blocks[i]!), `block ${i}`));

  await c.write(20 * MiB, Buffer.alloc(4096, 0x5c), { fua: true });
  await c.flush();
  assert.ok((await c.read(20 * MiB, 4096)).equals(Buffer.alloc(4096, 0x5c)));

  await c.writeZeroes(65536, 2 * 65536, { noHole: true });
  assert.ok((await c.read(65536, 2 * 65536)).equals(Buffer.alloc(2 * 65536)));
  assert.ok((await c.read(0, 65536)).equals(blocks[0]!), 'zeroing stayed in its range');
  await c.trim(3 * 65536, 65536);

  // The last block of the export, and client-side range checks.
  const end = c.size();
  await c.write(end - 4096, Buffer.alloc(4096, 0xee));
  assert.ok((await c.read(end - 4096, 4096)).equals(Buffer.alloc(4096, 0xee)));
  await assert.rejects(c.read(end - 512, 1024), RangeError);
  assert.equal((await c.read(0, 0)).length, 0);

  // A server-side read error fails that request only.
  failReads(true);
  await assert.rejects(c.read(0, 4096), (e: unknown) => e instanceof P.NbdRequestError && e.errno === P.NBD_EIO);
  failReads(false);
  assert.ok((await c.read(4 * 65536, 65536)).equals(blocks[4]!));
}

async function needNbdkit(t: TestContext): Promise<boolean> {
  if (!(await haveTool('nbdkit'))) {
    t.skip('nbdkit is not installed');
    return false;
  }
  return true;
}

for (const structured of [true, false]) {
  test(`client against nbdkit memory (${structured ? 'structured' : 'simple'} replies)`, async (t) => {
    if (!(await needNbdkit(t))) return;
    const kit = await startNbdkit('64M');
    try {
      const c = await connectNbd(kit.uri, { structuredReplies: structured, maxInFlight: 32 });
      assert.equal(c.size(), 64 * MiB);
      assert.equal(c.structuredReplies, structured);
      assert.equal(c.canDf, structured);
      await exercise(c, (on) => (on ? fs.writeFileSync(kit.errorFile, '') : fs.rmSync(kit.errorFile)));
      // A read larger than the portable 32 MiB maximum is split.
      const big = Buffer.alloc(40 * MiB);
      for (let i = 0; i < big.length; i += 4096) big.writeUInt32BE(i, i);
      await c.write(16 * MiB, big);
      assert.ok((await c.read(16 * MiB, 40 * MiB)).equals(big));
      // Reads into the caller's buffer: split or not, the data lands there and that buffer comes back;
      // a never-written range (a hole chunk, where the server sends one) overwrites stale bytes with zeros.
      const into = Buffer.alloc(40 * MiB, 0xaa);
      assert.equal(await c.read(16 * MiB, 40 * MiB, into), into);
      assert.ok(into.equals(big));
      const small = Buffer.alloc(64 * 1024, 0xaa);
      assert.equal(await c.read(16 * MiB + 4096, small.length, small), small);
      assert.ok(small.equals(big.subarray(4096, 4096 + small.length)));
      const hole = Buffer.alloc(1 * MiB, 0xaa);
      await c.read(60 * MiB, hole.length, hole);
      assert.ok(hole.equals(Buffer.alloc(hole.length)), 'an unwritten range reads as zeros into the buffer');
      await assert.rejects(c.read(0, 10, Buffer.alloc(9)), RangeError);
      await c.disconnect();
      await assert.rejects(c.read(0, 512), /disconnect|closed/);
      assert.deepEqual(await listNbdExports(kit.uri), [{ name: '', description: '' }]);
    } finally {
      await kit.stop();
    }
  });
}

for (const structured of [true, false]) {
  test(`client against our server over TCP (${structured ? 'structured' : 'simple'} replies)`, async () => {
    const srv = await startServer(64 * MiB, { exportName: 'disk', description: 'ours', maxBlock: 1 * MiB });
    try {
      const c = await connectNbd(`nbd://127.0.0.1:${srv.port}/disk`, { structuredReplies: structured });
      assert.equal(c.structuredReplies, structured);
      assert.deepEqual(c.blockSize, { minimum: 512, preferred: 4096, maximum: 1 * MiB });
      assert.equal(c.description, 'ours');
      await exercise(c, (on) => {
        srv.device.faults.read = on ? () => ioError() : undefined;
      });
      // Requests above the advertised maximum are split to fit it.
      const before = srv.server.stats().requests.write;
      const data = randomBytes(3 * MiB + 4096);
      await c.write(8 * MiB, data);
      assert.equal(srv.server.stats().requests.write - before, 4);
      assert.ok((await c.read(8 * MiB, data.length)).equals(data));
      assert.ok(srv.device.data.subarray(8 * MiB, 8 * MiB + data.length).equals(data));
      assert.ok(srv.device.calls.fua >= 1);
      await c.disconnect();
      assert.equal(srv.server.stats().requests.disc, 1);
      assert.equal(srv.server.stats().protocolErrors, 0);
      assert.deepEqual(await listNbdExports(`nbd://127.0.0.1:${srv.port}`), [{ name: 'disk', description: 'ours' }]);
      await assert.rejects(connectNbd(`nbd://127.0.0.1:${srv.port}/other`), /unknown|0x80000006/i);
    } finally {
      await srv.close();
    }
  });
}

test('client over a unix socket to our server, and a failing connection rejects in-flight requests', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-nbd-'));
  const sock = path.join(dir, 's');
  const srv = await startServer(4 * MiB);
  await srv.server.listenUnix(sock);
  try {
    const c = await connectNbd(`nbd+unix:///?socket=${sock}`);
    await c.write(0, Buffer.alloc(512, 1));
    assert.ok((await c.read(0, 512)).equals(Buffer.alloc(512, 1)));
    srv.device.faults.delay = () => 200;
    const inflight = assert.rejects(c.read(0, 512), /closed/);
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(c.inFlight, 1);
    await srv.server.close({ force: true });
    await inflight;
    await assert.rejects(c.read(0, 512), /closed/);
  } finally {
    await srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('our server re-exporting an nbdkit disk through the client (qemu-io end to end)', async (t) => {
  if (!(await needNbdkit(t))) return;
  if (!(await haveTool('qemu-io'))) return t.skip('qemu-io is not installed');
  const kit = await startNbdkit('32M');
  const upstream = await connectNbd(kit.uri);
  const proxy = createNbdServer({ device: upstream });
  try {
    const { port } = await proxy.listenTcp('127.0.0.1', 0);
    const r = await run('qemu-io', [
      '-f', 'raw', `nbd://127.0.0.1:${port}`,
      '-c', 'write -P 0x3c 1M 256k',
      '-c', 'write -z 1M 4k',
      '-c', 'flush',
      '-c', 'read -P 0 1M 4k',
      '-c', 'read -P 0x3c 1052672 258048',
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /fail|error/i);
    // Seen directly on nbdkit with a second connection.
    const direct = await connectNbd(kit.uri);
    const got = await direct.read(1 * MiB, 256 * 1024);
    assert.ok(got.subarray(0, 4096).equals(Buffer.alloc(4096)));
    assert.ok(got.subarray(4096).equals(Buffer.alloc(256 * 1024 - 4096, 0x3c)));
    await direct.disconnect();
  } finally {
    await proxy.close();
    await upstream.disconnect();
    await kit.stop();
  }
});
