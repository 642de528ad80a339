/**
 * The NBD backing adapter on its own: against nbdkit (multi-conn, a server killed and restarted,
 * a server that stays away, garbage mid-session) and against fake servers that break the handshake.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import type { BackingDevice } from '../../src/backing/backing.js';
import { FileBacking } from '../../src/backing/file.js';
import { openNbdBacking } from '../../src/backing/nbd.js';
import { isNbdUri, openBacking } from '../../src/backing/open.js';
import { encodeGreeting, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES } from '../../src/nbd/protocol.js';
import { startNbdkit, type ServerProc } from '../helpers/nbd-servers.js';
import { sparseFile } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, startServer } from '../nbd/helpers.js';
import { ioError } from '../nbd/memory-device.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function needNbdkit(t: TestContext): Promise<boolean> {
  if (await haveTool('nbdkit')) return true;
  t.skip('nbdkit is not installed');
  return false;
}

async function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

test('openBacking: URIs go to NBD, anything else to a file', async () => {
  assert.ok(isNbdUri('nbd://127.0.0.1:10809/x'));
  assert.ok(isNbdUri('nbd+unix:///?socket=/tmp/s'));
  assert.ok(isNbdUri('NBD://host'));
  assert.ok(isNbdUri('nbds://host/e'));
  assert.ok(!isNbdUri('/dev/sdb'));
  assert.ok(!isNbdUri('backing.img'));
  assert.ok(!isNbdUri('./nbd://x'));
  const dir = await tempDir();
  const f = await openBacking(await sparseFile(join(dir, 'b.img'), MiB));
  assert.ok(f instanceof FileBacking);
  assert.equal((f as BackingDevice).state, undefined, 'a file has no connection state');
  await f.close();
  await assert.rejects(openBacking('nbd://h/e?tls-psk-file=/k.psk'), /use nbds:\/\//);
  await assert.rejects(openBacking('nbd+unix:///e'), /socket=/);
});

test('nbdkit file: four connections used round-robin, data reaches the file, flush works', async (t) => {
  if (!(await needNbdkit(t))) return;
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 32 * MiB);
  const logFile = join(dir, 'nbdkit.log');
  const srv = await startNbdkit(dir, ['--filter=log', 'file', disk, `logfile=${logFile}`]);
  const b = await openNbdBacking(srv.uri);
  try {
    assert.equal(b.size(), 32 * MiB);
    const st = b.state();
    assert.equal(st.state, 'connected');
    assert.equal(st.connections, 4);
    assert.equal(st.maxConnections, 4);
    assert.equal(st.multiConn, true);
    const blocks = Array.from({ length: 64 }, () => randomBytes(64 * 1024));
    await Promise.all(blocks.map((d, i) => b.write(d, i * 256 * 1024)));
    await b.flush();
    const back = blocks.map(() => Buffer.alloc(64 * 1024));
    await Promise.all(back.map((buf, i) => b.read(buf, i * 256 * 1024)));
    back.forEach((buf, i) => assert.ok(buf.equals(blocks[i]!), `block ${i}`));
    const file = await readFile(disk);
    blocks.forEach((d, i) => assert.ok(file.subarray(i * 256 * 1024, i * 256 * 1024 + d.length).equals(d), `file block ${i}`));
    // The last byte of the device, and a range past it.
    await b.write(Buffer.alloc(512, 0xee), 32 * MiB - 512);
    await assert.rejects(b.write(Buffer.alloc(512), 32 * MiB - 256), RangeError);
    await assert.rejects(b.read(Buffer.alloc(512), 32 * MiB), RangeError);
  } finally {
    await b.close();
    await srv.stop();
  }
  const log = await readFile(logFile, 'utf8');
  const used = new Set([...log.matchAll(/connection=(\d+) (?:Write|Read) /g)].map((m) => m[1]));
  assert.equal(used.size, 4, `requests spread over every connection: ${[...used].join(',')}`);
  assert.match(log, /Flush/);
  assert.equal(b.state().state, 'closed');
  await assert.rejects(b.read(Buffer.alloc(512), 0), { code: 'EIO' });
});

test('nbd:// over TCP (pcache\'s own NBD server): error replies pass through as they are, without a reconnect', async () => {
  const srv = await startServer(8 * MiB, { exportName: 'disk' });
  srv.device.faults.read = (off) => (off === 4096 ? ioError('bad sector') : undefined);
  const b = await openNbdBacking(`nbd://127.0.0.1:${srv.port}/disk`, { connections: 2 });
  try {
    assert.equal(b.state().connections, 2);
    const d = randomBytes(8192);
    await b.write(d, 8192);
    await b.flush();
    assert.ok(srv.device.data.subarray(8192, 16384).equals(d));
    assert.ok(srv.device.calls.flush >= 1);
    await assert.rejects(b.read(Buffer.alloc(4096), 4096), (e: NodeJS.ErrnoException) => e.code === 'EIO');
    const back = Buffer.alloc(8192);
    await b.read(back, 8192);
    assert.ok(back.equals(d));
    const st = b.state();
    assert.equal(st.disconnects, 0);
    assert.equal(st.retries, 0);
    assert.equal(st.state, 'connected');
    await b.flush(); // no loss: nothing refused
    assert.equal(b.state().flushesRefused, 0);
    // A flush issued while writes are in flight (on both connections) waits for their answers.
    srv.device.faults.delay = (op) => (op === 'write' ? 100 : 0);
    let answered = 0;
    const writes = Array.from({ length: 8 }, (_, i) => b.write(Buffer.alloc(4096, i + 1), MiB + i * 4096).then(() => void answered++));
    const flushesBefore = srv.device.calls.flush;
    await b.flush();
    assert.equal(answered, 8, 'every write issued before the flush was answered before it');
    assert.ok(srv.device.calls.flush > flushesBefore);
    await Promise.all(writes);
    await assert.rejects(openNbdBacking(`nbd://127.0.0.1:${srv.port}/nope`, { connectTimeoutMs: 1000 }), /cannot open the NBD backing device .*nope/);
  } finally {
    await b.close();
    await srv.close();
  }
});

test('a server without CAN_MULTI_CONN gets one connection; a read-only export is refused', async (t) => {
  if (!(await needNbdkit(t))) return;
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 8 * MiB);
  const srv = await startNbdkit(dir, ['--filter=multi-conn', 'file', disk, 'multi-conn-mode=disable'], 'single');
  const ro = await startNbdkit(dir, ['-r', 'file', disk], 'ro');
  try {
    const b = await openNbdBacking(srv.uri, { connections: 8 });
    assert.equal(b.state().maxConnections, 1);
    assert.equal(b.state().multiConn, false);
    await b.write(Buffer.alloc(4096, 1), 0);
    await b.flush();
    await b.close();
    await assert.rejects(openNbdBacking(ro.uri), /cannot use the NBD backing device .*read-only/);
  } finally {
    await srv.stop();
    await ro.stop();
  }
});

test('server killed and restarted with writes in flight: they are retried, the next flush is refused once, data is right', async (t) => {
  if (!(await needNbdkit(t))) return;
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 16 * MiB);
  // Slow writes, so that many are in flight when the server dies.
  const srv = await startNbdkit(dir, ['--filter=delay', 'file', disk, 'delay-write=100ms']);
  const events: string[] = [];
  const b = await openNbdBacking(srv.uri, { reconnectMinMs: 20, reconnectMaxMs: 100, log: (m) => events.push(m) });
  try {
    await b.write(Buffer.alloc(4096, 0x11), 0);
    await b.flush();
    const blocks = Array.from({ length: 48 }, () => randomBytes(32 * 1024));
    const writes = blocks.map((d, i) => b.write(d, MiB + i * 64 * 1024));
    await sleep(30);
    assert.ok(b.state().pending > 0, 'writes are in flight');
    await srv.kill('SIGKILL');
    await until('disconnected state', () => b.state().state === 'disconnected');
    const down = b.state();
    assert.equal(down.connected, false);
    assert.equal(down.connections, 0);
    assert.ok(down.disconnects >= 4, `disconnects ${down.disconnects}`);
    assert.ok(down.disconnectedSince);
    assert.match(String(down.lastError), /lost|refused|ENOENT|ECONNREFUSED/);
    await sleep(300); // down for a while: the adapter keeps trying
    await srv.restart();
    await Promise.all(writes);
    await until('connected again', () => b.state().state === 'connected');
    const st = b.state();
    assert.ok(st.reconnects >= 4, `reconnects ${st.reconnects}`);
    assert.ok(st.retries >= 1, `retries ${st.retries}`);
    assert.ok(events.some((e) => /lost/.test(e)) && events.some((e) => /restored/.test(e)), events.join('\n'));
    // Writes the dead server acknowledged may be gone: the first flush says so, once.
    await assert.rejects(b.flush(), (e: NodeJS.ErrnoException) => e.code === 'EIO' && /lost since the last flush/.test(e.message));
    assert.equal(b.state().flushesRefused, 1);
    // The caller (write-back) sends its writes again, then flushes.
    await Promise.all(blocks.map((d, i) => b.write(d, MiB + i * 64 * 1024)));
    await b.flush();
    const file = await readFile(disk);
    assert.ok(file.subarray(0, 4096).equals(Buffer.alloc(4096, 0x11)));
    blocks.forEach((d, i) => assert.ok(file.subarray(MiB + i * 64 * 1024, MiB + i * 64 * 1024 + d.length).equals(d), `block ${i}`));
  } finally {
    await b.close();
    await srv.stop();
  }
});

test('a server that stays away: requests fail with EIO after the bounded time, then work once it is back', async (t) => {
  if (!(await needNbdkit(t))) return;
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 8 * MiB);
  const srv = await startNbdkit(dir, ['file', disk]);
  const b = await openNbdBacking(srv.uri, { requestTimeoutMs: 400, reconnectMinMs: 20, reconnectMaxMs: 100, connections: 2 });
  try {
    await b.write(Buffer.alloc(4096, 0x22), 0);
    await srv.kill('SIGKILL');
    const t0 = Date.now();
    await assert.rejects(b.read(Buffer.alloc(4096), 0), (e: NodeJS.ErrnoException) => e.code === 'EIO' && /400 ms/.test(e.message));
    const took = Date.now() - t0;
    assert.ok(took >= 350 && took < 2000, `failed after ${took} ms`);
    await assert.rejects(b.write(Buffer.alloc(4096), 0), { code: 'EIO' });
    assert.ok(b.state().timeouts >= 2);
    await srv.restart();
    const buf = Buffer.alloc(4096);
    await b.read(buf, 0);
    assert.ok(buf.equals(Buffer.alloc(4096, 0x22)));
    await assert.rejects(b.flush(), { code: 'EIO' }); // the loss is reported once
    await b.flush();
  } finally {
    await b.close();
    await srv.stop();
  }
});

/** A unix-socket server that runs `onConn` for every connection. */
async function fakeServer(dir: string, name: string, onConn: (s: net.Socket) => void): Promise<{ uri: string; close(): Promise<void> }> {
  const path = join(dir, `${name}.sock`);
  const conns = new Set<net.Socket>();
  const server = net.createServer((s) => {
    conns.add(s);
    s.on('error', () => undefined);
    s.on('close', () => conns.delete(s));
    onConn(s);
  });
  await new Promise<void>((r) => server.listen(path, r));
  return {
    uri: `nbd+unix:///?socket=${path}`,
    close: () =>
      new Promise<void>((r) => {
        for (const c of conns) c.destroy();
        server.close(() => r());
      }),
  };
}

test('broken handshakes give a clear error, never a crash', async () => {
  const dir = await tempDir();
  const cases: Array<{ name: string; onConn: (s: net.Socket) => void; expect: RegExp }> = [
    { name: 'hangup', onConn: (s) => s.destroy(), expect: /closed the connection during the handshake|ECONNRESET|EPIPE/ },
    {
      name: 'mid-handshake',
      // A good greeting, then the server goes away after the client's flags.
      onConn: (s) => {
        s.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
        s.once('data', () => s.destroy());
      },
      expect: /closed the connection during the handshake|ECONNRESET|EPIPE/,
    },
    { name: 'garbage', onConn: (s) => s.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n')), expect: /magic|NBD|greeting/i },
    {
      name: 'garbage-reply',
      // A good greeting, then nonsense where an option reply should be.
      onConn: (s) => {
        s.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
        s.on('data', () => s.write(randomBytes(64)));
      },
      expect: /magic|reply|option/i,
    },
    { name: 'silent', onConn: () => undefined, expect: /timed out/ },
  ];
  for (const c of cases) {
    const srv = await fakeServer(dir, c.name, c.onConn);
    try {
      const t0 = Date.now();
      await assert.rejects(openNbdBacking(srv.uri, { connectTimeoutMs: 500 }), (e: Error) => {
        assert.match(e.message, /^cannot open the NBD backing device nbd\+unix:/, c.name);
        assert.match(e.message, c.expect, `${c.name}: ${e.message}`);
        return true;
      });
      assert.ok(Date.now() - t0 < 3000, c.name);
    } finally {
      await srv.close();
    }
  }
  // Nothing listening at all: a few quick retries, then a clear error.
  const t0 = Date.now();
  await assert.rejects(openNbdBacking(`nbd+unix:///?socket=${join(dir, 'absent.sock')}`, { connectTimeoutMs: 400 }), /cannot open the NBD backing device .*ENOENT/);
  assert.ok(Date.now() - t0 < 2000);
  await assert.rejects(openNbdBacking('nbd://127.0.0.1:1/', { connectTimeoutMs: 300 }), /cannot open .*ECONNREFUSED/);
});

test('garbage from the server mid-session: the connection is dropped and re-opened, the request answered', async (t) => {
  if (!(await needNbdkit(t))) return;
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 8 * MiB);
  const upstream: ServerProc = await startNbdkit(dir, ['file', disk]);
  // A proxy that, while `garbage` is set, answers everything with noise instead of the server's bytes.
  let garbage = false;
  const proxy = await fakeServer(dir, 'proxy', (s) => {
    if (garbage) {
      s.end(Buffer.alloc(64, 0x5a));
      return;
    }
    const up = net.connect({ path: upstream.sock });
    up.on('error', () => s.destroy());
    s.on('close', () => up.destroy());
    up.on('close', () => s.destroy());
    s.on('data', (d) => {
      up.write(d);
    });
    up.on('data', (d) => void s.write(garbage ? Buffer.alloc(d.length, 0x5a) : d));
  });
  const b = await openNbdBacking(proxy.uri, { connections: 1, reconnectMinMs: 20, reconnectMaxMs: 50, requestTimeoutMs: 5000 });
  try {
    await b.write(Buffer.alloc(4096, 0x33), 8192);
    garbage = true;
    const buf = Buffer.alloc(4096);
    const read = b.read(buf, 8192);
    await until('the broken connection is dropped', () => b.state().disconnects >= 1);
    await sleep(200); // reconnections meet garbage too
    assert.match(String(b.state().lastError), /magic|reply|protocol|closed/i);
    garbage = false;
    await read;
    assert.ok(buf.equals(Buffer.alloc(4096, 0x33)));
    assert.ok(b.state().retries >= 1);
    // With garbage that does not stop, the request fails with EIO at the deadline.
    const short = await openNbdBacking(proxy.uri, { connections: 1, reconnectMinMs: 20, reconnectMaxMs: 50, requestTimeoutMs: 300 });
    garbage = true;
    await assert.rejects(short.read(Buffer.alloc(512), 0), { code: 'EIO' });
    garbage = false;
    await short.close();
  } finally {
    await b.close();
    await proxy.close();
    await upstream.stop();
  }
});
