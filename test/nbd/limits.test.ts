/**
 * The server against hostile clients: ones that never read their replies, silent sockets
 * beyond the connection limit, clients that never finish the handshake; and read-only exports.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import type net from 'node:net';
import { connectNbd, type NbdClient } from '../../src/nbd/client.js';
import * as P from '../../src/nbd/protocol.js';
import { loadServerTls } from '../../src/nbd/tls.js';
import { tempDir } from '../helpers/tmp.js';
import { needTools, RawConn, run, startServer } from './helpers.js';
import { nonReadingClient, silentClient } from './hostile.js';
import { makePskFile } from './tls-fixtures.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

test('clients that never read replies: the held bytes stay within budget, a normal client is served, stalled ones are dropped', async () => {
  const dir = await tempDir();
  const sock = path.join(dir, 'nbd.sock');
  const budget = { connectionQueueBytes: 8 * MiB, totalQueueBytes: 16 * MiB, maxBlock: 4 * MiB, stalledReplyTimeoutMs: 1500 };
  const srv = await startServer(64 * MiB, budget);
  await srv.server.listenUnix(sock);
  srv.device.data.fill(0x42);
  let maxHeld = 0;
  const sampler = setInterval(() => (maxHeld = Math.max(maxHeld, srv.server.stats().queuedBytes)), 5);
  const hostile: net.Socket[] = [];
  try {
    // Each asks for 64 MiB of replies and reads none: 512 MiB in all against a 16 MiB budget.
    for (let i = 0; i < 8; i++) hostile.push(await nonReadingClient({ path: sock }, 16, 4 * MiB));
    await until('the budget to fill', () => srv.server.stats().queuedBytes >= budget.totalQueueBytes);
    await sleep(300);
    const limit = budget.totalQueueBytes * 1.5 + budget.maxBlock;
    assert.ok(maxHeld <= limit, `held ${maxHeld} bytes, more than ${limit}`);

    // A client that reads its replies still gets a full-size read answered.
    const started = Date.now();
    const c = await connectNbd(`nbd+unix:///?socket=${sock}`);
    const got = await c.read(8 * MiB, 4 * MiB);
    assert.ok(got.equals(Buffer.alloc(4 * MiB, 0x42)));
    await c.disconnect();
    assert.ok(Date.now() - started < 10_000);
    // It waited for room, so the clients sitting on unread replies were dropped.
    assert.ok(srv.server.stats().stalledDropped >= 1, JSON.stringify(srv.server.stats()));
    assert.ok(srv.logs.some((l) => /replies unread for 1500 ms/.test(l)));
    assert.ok(maxHeld <= limit, `held ${maxHeld} bytes, more than ${limit}`);

    for (const s of hostile) s.destroy();
    await until('every hostile connection to close', () => srv.server.stats().connectionsActive === 0);
    assert.equal(srv.server.stats().queuedBytes, 0, 'everything held is released when the clients leave');
  } finally {
    clearInterval(sampler);
    for (const s of hostile) s.destroy();
    await srv.close();
  }
});

test('a slow reader is paused, not dropped, while nobody else waits; its replies all arrive in order', async () => {
  const srv = await startServer(32 * MiB, { connectionQueueBytes: 4 * MiB, maxBlock: 2 * MiB, stalledReplyTimeoutMs: 200 });
  srv.device.data.fill(7);
  const c = await connectNbd(srv.uri, { maxInFlight: 64 });
  try {
    const reads = Array.from({ length: 48 }, (_, i) => c.read((i % 16) * 2 * MiB, 2 * MiB));
    let maxHeld = 0;
    const sampler = setInterval(() => (maxHeld = Math.max(maxHeld, srv.server.stats().queuedBytes)), 2);
    const all = await Promise.all(reads);
    clearInterval(sampler);
    assert.ok(all.every((b) => b.length === 2 * MiB && b[0] === 7 && b[b.length - 1] === 7));
    assert.ok(maxHeld <= 4 * MiB + 2 * MiB, `one connection held ${maxHeld} bytes`);
    assert.equal(srv.server.stats().stalledDropped, 0);
  } finally {
    await c.disconnect();
    await srv.close();
  }
});

test('connection limit: silent sockets beyond it are closed at once; an old silent one makes room for a real client', async (t) => {
  if (!(await needTools(t, 'nbdinfo'))) return;
  const srv = await startServer(MiB, { maxConnections: 8, handshakeTimeoutMs: 60_000 });
  const addr = { host: '127.0.0.1', port: srv.port };
  const silent: { socket: net.Socket; closed: Promise<void> }[] = [];
  try {
    for (let i = 0; i < 8; i++) silent.push(await silentClient(addr));
    // A flood of 200 more, all refused while the first 8 are younger than the grace time.
    const flood = await Promise.all(Array.from({ length: 200 }, () => silentClient(addr).catch(() => null)));
    await Promise.all(flood.map((f) => f?.closed));
    const s = srv.server.stats();
    assert.ok(s.connectionsActive <= 8, `active ${s.connectionsActive}`);
    assert.equal(s.connectionsRefused + s.connectionsEvicted, flood.filter(Boolean).length);
    assert.ok(srv.logs.some((l) => /connection limit 8 reached/.test(l)));

    // After the grace time, a real client takes the place of the oldest silent socket.
    await sleep(1100);
    const r = await run('nbdinfo', ['--size', srv.uri]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), String(MiB));
    assert.ok(srv.server.stats().connectionsEvicted >= 1);
    await Promise.race([silent[0]!.closed, sleep(2000).then(() => assert.fail('the oldest silent socket was not dropped'))]);
  } finally {
    for (const x of silent) x.socket.destroy();
    await srv.close();
  }
});

test('connection limit: clients in transmission are never evicted; a new one is refused until one leaves', async (t) => {
  if (!(await needTools(t, 'nbdinfo'))) return;
  const srv = await startServer(MiB, { maxConnections: 4 });
  const clients: NbdClient[] = [];
  try {
    for (let i = 0; i < 4; i++) clients.push(await connectNbd(srv.uri));
    await sleep(1100);
    const refused = await run('nbdinfo', ['--size', srv.uri]);
    assert.notEqual(refused.code, 0);
    for (const c of clients) assert.equal((await c.read(0, 512)).length, 512);
    await clients.pop()!.disconnect();
    await until('the slot to free', () => srv.server.stats().connectionsActive === 3);
    const ok = await run('nbdinfo', ['--size', srv.uri]);
    assert.equal(ok.code, 0, ok.stderr);
  } finally {
    for (const c of clients) await c.disconnect();
    await srv.close();
  }
});

test('handshake timeout: silent, half-option and stalled-TLS clients are dropped; an idle client in transmission is not', async () => {
  const dir = await tempDir();
  const { file } = makePskFile(dir, ['alice']);
  const srv = await startServer(MiB, { handshakeTimeoutMs: 300, tls: loadServerTls({ mode: 'on', pskFile: file }) });
  try {
    const silent = await RawConn.connect(srv.port);
    const half = await RawConn.connect(srv.port);
    await half.read(P.HANDSHAKE_GREETING_SIZE);
    half.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    half.write(P.encodeOption(P.NBD_OPT_GO, P.encodeInfoRequest('', [])).subarray(0, 10));
    // STARTTLS acknowledged, then no ClientHello.
    const tlsStall = await RawConn.connect(srv.port);
    await tlsStall.read(P.HANDSHAKE_GREETING_SIZE);
    tlsStall.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    tlsStall.write(P.encodeOption(P.NBD_OPT_STARTTLS));
    const ack = P.decodeOptionReplyHeader(await tlsStall.read(P.OPTION_REPLY_HEADER_SIZE));
    assert.equal(ack.type, P.NBD_REP_ACK);
    const idle = await connectNbd(srv.uri);
    const started = Date.now();
    for (const c of [silent, half, tlsStall]) assert.ok(await c.waitClosed(3000), 'dropped by the handshake timeout');
    assert.ok(Date.now() - started < 3000);
    assert.equal(srv.server.stats().handshakeTimeouts, 3);
    assert.equal(srv.logs.filter((l) => /handshake not finished within 300 ms/.test(l)).length, 3);
    await sleep(400);
    assert.equal((await idle.read(0, 4096)).length, 4096, 'a client past the handshake may idle');
    await idle.disconnect();
  } finally {
    await srv.close();
  }
});

test('read-only export: NBD_FLAG_READ_ONLY, writes, trims and zeroing refused with EPERM, nothing changes', async (t) => {
  const srv = await startServer(4 * MiB, { readOnly: true });
  srv.device.data.fill(0x33);
  try {
    const c = await connectNbd(srv.uri);
    assert.ok(c.readOnly);
    assert.ok(!c.canTrim && !c.canWriteZeroes && !c.canFua, 'nothing that writes is advertised');
    // Sent by hand: the client itself refuses to write to a read-only export.
    for (const [type, payload] of [[P.NBD_CMD_WRITE, Buffer.alloc(4096)], [P.NBD_CMD_TRIM, undefined], [P.NBD_CMD_WRITE_ZEROES, undefined]] as const) {
      await assert.rejects(c.request(type, 0, 0, 4096, payload), (e: unknown) => (e as P.NbdRequestError).errno === P.NBD_EPERM);
    }
    await c.flush();
    assert.ok((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x33)));
    await c.disconnect();
    assert.ok(srv.device.data.equals(Buffer.alloc(4 * MiB, 0x33)));
    if (await needTools(t, 'nbdinfo')) {
      const r = await run('nbdinfo', ['--json', srv.uri]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(JSON.parse(r.stdout).exports[0].is_read_only, true);
    }
  } finally {
    await srv.close();
  }
});
