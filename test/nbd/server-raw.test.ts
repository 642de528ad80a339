/** The server spoken to byte by byte: negotiation, validation, pipelining, abuse and shutdown. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as P from '../../src/nbd/protocol.js';
import { createNbdServer } from '../../src/nbd/server.js';
import { RawConn, haveTool, run, startServer, type TestServer } from './helpers.js';
import { MemoryDevice, ioError } from './memory-device.js';
import { handshake, option, readGreeting, readReply, request } from './raw-client.js';

const MiB = 1024 * 1024;

test('option negotiation: INFO, LIST, unsupported and invalid options, then GO', async () => {
  const srv = await startServer(8 * MiB, { exportName: 'disk', description: 'the disk', maxBlock: 4 * MiB });
  try {
    const c = await RawConn.connect(srv.port);
    await readGreeting(c);
    c.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));

    const info = await option(
      c,
      P.NBD_OPT_INFO,
      P.encodeInfoRequest('disk', [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE]),
    );
    assert.equal(info.at(-1)!.type, P.NBD_REP_ACK);
    const decoded = info.slice(0, -1).map((r) => {
      assert.equal(r.type, P.NBD_REP_INFO);
      return P.decodeInfoReply(r.data);
    });
    assert.deepEqual(decoded, [
      {
        type: P.NBD_INFO_EXPORT,
        size: 8 * MiB,
        transmissionFlags:
          P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM |
          P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_CAN_MULTI_CONN,
      },
      { type: P.NBD_INFO_NAME, name: 'disk' },
      { type: P.NBD_INFO_DESCRIPTION, description: 'the disk' },
      { type: P.NBD_INFO_BLOCK_SIZE, minimum: 512, preferred: 4096, maximum: 4 * MiB },
    ]);

    const list = await option(c, P.NBD_OPT_LIST);
    assert.deepEqual(list.map((r) => r.type), [P.NBD_REP_SERVER, P.NBD_REP_ACK]);
    assert.deepEqual(P.decodeRepServer(list[0]!.data), { name: 'disk', description: 'the disk' });

    const expectFinal = async (opt: number, data: Buffer | undefined, type: number): Promise<void> => {
      const r = await option(c, opt, data);
      assert.equal(r.length, 1);
      assert.equal(r[0]!.type, type, `${P.optionName(opt)} -> 0x${r[0]!.type.toString(16)}`);
    };
    await expectFinal(P.NBD_OPT_LIST, Buffer.from('x'), P.NBD_REP_ERR_INVALID);
    await expectFinal(P.NBD_OPT_STARTTLS, undefined, P.NBD_REP_ERR_UNSUP);
    await expectFinal(P.NBD_OPT_SET_META_CONTEXT, Buffer.alloc(8), P.NBD_REP_ERR_UNSUP);
    await expectFinal(P.NBD_OPT_LIST_META_CONTEXT, Buffer.alloc(8), P.NBD_REP_ERR_UNSUP);
    await expectFinal(P.NBD_OPT_EXTENDED_HEADERS, undefined, P.NBD_REP_ERR_UNSUP);
    await expectFinal(999, Buffer.alloc(100, 7), P.NBD_REP_ERR_UNSUP);
    await expectFinal(P.NBD_OPT_INFO, Buffer.from([0, 0, 0, 9, 1]), P.NBD_REP_ERR_INVALID);
    await expectFinal(P.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x'), P.NBD_REP_ERR_INVALID);
    await expectFinal(P.NBD_OPT_GO, P.encodeInfoRequest('nope', []), P.NBD_REP_ERR_UNKNOWN);
    await expectFinal(P.NBD_OPT_STRUCTURED_REPLY, undefined, P.NBD_REP_ACK);

    // '' names the default export, which is the only one; DF is offered once structured.
    const go = await option(c, P.NBD_OPT_GO, P.encodeInfoRequest('', []));
    assert.equal(go.at(-1)!.type, P.NBD_REP_ACK);
    const exp = P.decodeInfoReply(go[0]!.data);
    assert.ok('transmissionFlags' in exp && (exp.transmissionFlags & P.NBD_FLAG_SEND_DF) !== 0);
    assert.ok(go.some((r) => P.decodeInfoReply(r.data).type === P.NBD_INFO_BLOCK_SIZE), 'block size sent unasked');

    srv.device.data.fill(0x33, 0, 512);
    request(c, P.NBD_CMD_READ, 1n, 0, 512);
    const r = await readReply(c);
    assert.equal(r.error, 0);
    assert.deepEqual(r.data, Buffer.alloc(512, 0x33));
    c.destroy();
  } finally {
    await srv.close();
  }
});

test('NBD_OPT_EXPORT_NAME with and without NO_ZEROES; unknown name and ABORT close', async () => {
  const srv = await startServer(1 * MiB, { exportName: 'e' });
  try {
    for (const noZeroes of [true, false]) {
      const c = await RawConn.connect(srv.port);
      await readGreeting(c);
      c.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0)));
      c.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('e')));
      const rep = P.decodeExportNameReply(await c.read(P.EXPORT_NAME_REPLY_SIZE));
      assert.equal(rep.size, 1 * MiB);
      assert.equal(rep.transmissionFlags & P.NBD_FLAG_SEND_DF, 0);
      if (!noZeroes) assert.deepEqual(await c.read(124), Buffer.alloc(124));
      request(c, P.NBD_CMD_FLUSH, 77n, 0, 0);
      assert.deepEqual(await readReply(c), { handle: 77n, error: 0, data: undefined });
      request(c, P.NBD_CMD_DISC, 78n, 0, 0);
      assert.ok(await c.waitClosed(), 'DISC closes the connection');
    }

    const bad = await RawConn.connect(srv.port);
    await readGreeting(bad);
    bad.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    bad.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('other')));
    assert.ok(await bad.waitClosed(), 'unknown EXPORT_NAME terminates the session');

    const ab = await RawConn.connect(srv.port);
    await readGreeting(ab);
    ab.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    const r = await option(ab, P.NBD_OPT_ABORT);
    assert.equal(r[0]!.type, P.NBD_REP_ACK);
    assert.ok(await ab.waitClosed());

    const flags = await RawConn.connect(srv.port);
    await readGreeting(flags);
    flags.write(P.encodeClientFlags(0x10));
    assert.ok(await flags.waitClosed(), 'unknown client flags close the connection');
    assert.ok(srv.server.stats().protocolErrors >= 1);
  } finally {
    await srv.close();
  }
});

for (const structured of [false, true]) {
  test(`request validation and commands (${structured ? 'structured' : 'simple'} replies)`, async () => {
    const size = 4 * MiB;
    const srv = await startServer(size, { maxBlock: 1 * MiB });
    try {
      const c = await RawConn.connect(srv.port);
      const neg = await handshake(c, { structured });
      assert.equal(neg.size, size);
      let h = 0n;
      const lengths = new Map<bigint, number>();
      const call = async (type: number, offset: number, length: number, flags = 0, payload?: Buffer) => {
        const handle = ++h;
        if (type === P.NBD_CMD_READ) lengths.set(handle, length);
        request(c, type, handle, offset, length, flags, payload);
        const r = await readReply(c, (x) => lengths.get(x) ?? 0);
        assert.equal(r.handle, handle);
        return r;
      };
      const { EINVAL, ENOSPC } = { EINVAL: P.NBD_EINVAL, ENOSPC: P.NBD_ENOSPC };

      const data = randomBytes(8192);
      assert.equal((await call(P.NBD_CMD_WRITE, 4096, 8192, P.NBD_CMD_FLAG_FUA, data)).error, 0);
      assert.equal(srv.device.calls.fua, 1);
      assert.deepEqual((await call(P.NBD_CMD_READ, 4096, 8192)).data, data);

      // Range: READ/TRIM past the end are EINVAL, WRITE/WRITE_ZEROES ENOSPC (proto.md).
      assert.equal((await call(P.NBD_CMD_READ, size - 512, 1024)).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_READ, 2 ** 52, 512)).error, EINVAL);
      {
        // offset 2^64-512: would wrap around in 64-bit arithmetic
        const hdr = P.encodeRequestHeader({ type: P.NBD_CMD_READ, flags: 0, handle: 4242n, offset: 0, length: 512 });
        hdr.writeBigUInt64BE(0xfffffffffffffe00n, 16);
        c.write(hdr);
        const r = await readReply(c);
        assert.deepEqual([r.handle, r.error], [4242n, EINVAL]);
      }
      assert.equal((await call(P.NBD_CMD_WRITE, size - 512, 1024, 0, Buffer.alloc(1024))).error, ENOSPC);
      assert.equal((await call(P.NBD_CMD_WRITE_ZEROES, size, 512)).error, ENOSPC);
      assert.equal((await call(P.NBD_CMD_TRIM, size - 512, 4096)).error, EINVAL);
      // Alignment to the advertised 512-byte minimum.
      assert.equal((await call(P.NBD_CMD_READ, 100, 512)).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_WRITE, 0, 100, 0, Buffer.alloc(100))).error, EINVAL);
      // Lengths above the maximum block size.
      assert.equal((await call(P.NBD_CMD_READ, 0, 2 * MiB)).error, EINVAL);
      // Flags that do not belong to the command, unknown commands, a non-empty FLUSH.
      assert.equal((await call(P.NBD_CMD_WRITE, 0, 512, P.NBD_CMD_FLAG_NO_HOLE, Buffer.alloc(512))).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_WRITE_ZEROES, 0, 512, P.NBD_CMD_FLAG_FAST_ZERO)).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_READ, 0, 512, 0x100)).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_BLOCK_STATUS, 0, 512)).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_CACHE, 0, 512)).error, EINVAL);
      assert.equal((await call(42, 0, 0)).error, EINVAL);
      assert.equal((await call(P.NBD_CMD_FLUSH, 0, 512)).error, EINVAL);
      // DF is only valid once structured replies are negotiated.
      const df = await call(P.NBD_CMD_READ, 4096, 512, P.NBD_CMD_FLAG_DF);
      assert.equal(df.error, structured ? 0 : EINVAL);
      if (structured) {
        assert.deepEqual(df.data, data.subarray(0, 512));
        const e = await call(P.NBD_CMD_READ, size, 512);
        assert.match(e.message ?? '', /range/);
      }
      // Nothing rejected reached the device.
      assert.equal(srv.device.calls.write, 1);

      // WRITE_ZEROES (with NO_HOLE) and TRIM both leave zeroes.
      assert.equal((await call(P.NBD_CMD_WRITE_ZEROES, 4096, 4096, P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FUA)).error, 0);
      assert.equal((await call(P.NBD_CMD_TRIM, 8192, 4096)).error, 0);
      assert.deepEqual((await call(P.NBD_CMD_READ, 4096, 8192)).data, Buffer.alloc(8192));
      assert.equal((await call(P.NBD_CMD_FLUSH, 0, 0, P.NBD_CMD_FLAG_FUA)).error, 0);
      // Zero-length requests succeed without touching anything.
      const z = await call(P.NBD_CMD_READ, 0, 0);
      assert.equal(z.error, 0);
      assert.equal((await call(P.NBD_CMD_WRITE, 0, 0)).error, 0);
      // A full maximum-size request is fine; the last block is reachable.
      const big = randomBytes(1 * MiB);
      assert.equal((await call(P.NBD_CMD_WRITE, size - MiB, MiB, 0, big)).error, 0);
      assert.deepEqual((await call(P.NBD_CMD_READ, size - MiB, MiB)).data, big);

      // Device failures: err.code is carried over when it means something on the wire.
      srv.device.faults.write = (off) => (off === 0 ? Object.assign(new Error('full'), { code: 'ENOSPC' }) : undefined);
      srv.device.faults.read = (off) => (off === 0 ? new Error('no code') : undefined);
      assert.equal((await call(P.NBD_CMD_WRITE, 0, 512, 0, Buffer.alloc(512))).error, ENOSPC);
      const re = await call(P.NBD_CMD_READ, 0, 512);
      assert.equal(re.error, P.NBD_EIO);
      assert.equal(re.data, undefined);
      if (structured) assert.match(re.message ?? '', /no code/);
      srv.device.faults = {};
      assert.equal((await call(P.NBD_CMD_READ, 0, 512)).error, 0);

      const st = srv.server.stats();
      assert.equal(st.deviceErrors, 2);
      assert.ok(st.requests.read >= 8 && st.requests.write >= 5 && st.requests.other >= 3);
      c.destroy();
    } finally {
      await srv.close();
    }
  });
}

test('pipelined requests are served concurrently and answered out of order', async () => {
  const srv = await startServer(4 * MiB);
  srv.device.faults.delay = (op, offset) => (op === 'read' && offset === 0 ? 150 : 0);
  try {
    const c = await RawConn.connect(srv.port);
    await handshake(c, { structured: true });
    // One TCP write with many requests: the slow read must not hold the others back.
    const reqs: Buffer[] = [P.encodeRequestHeader({ type: P.NBD_CMD_READ, flags: 0, handle: 1000n, offset: 0, length: 4096 })];
    const expected = new Map<bigint, Buffer>();
    for (let i = 1; i <= 64; i++) {
      const d = randomBytes(4096);
      expected.set(BigInt(i), d);
      reqs.push(P.encodeRequestHeader({ type: P.NBD_CMD_WRITE, flags: 0, handle: BigInt(i), offset: i * 4096, length: 4096 }), d);
    }
    c.write(Buffer.concat(reqs));
    const order: bigint[] = [];
    for (let i = 0; i < 65; i++) {
      const r = await readReply(c);
      assert.equal(r.error, 0);
      order.push(r.handle);
    }
    assert.equal(order.at(-1), 1000n, 'the delayed read is answered last');
    assert.deepEqual(new Set(order).size, 65);
    for (const [h, d] of expected) assert.deepEqual(srv.device.data.subarray(Number(h) * 4096, Number(h) * 4096 + 4096), d);

    // Requests split at every byte boundary still parse.
    const hdr = P.encodeRequestHeader({ type: P.NBD_CMD_WRITE, flags: 0, handle: 5n, offset: 8192, length: 1024 });
    const wire = Buffer.concat([hdr, Buffer.alloc(1024, 0xee)]);
    for (let i = 0; i < wire.length; i += 7) {
      c.write(wire.subarray(i, i + 7));
      await new Promise((r) => setImmediate(r));
    }
    assert.equal((await readReply(c)).error, 0);
    assert.ok(srv.device.data.subarray(8192, 9216).every((b) => b === 0xee));
    c.destroy();
  } finally {
    await srv.close();
  }
});

/** A fresh client must still get in, by nbdinfo when installed, else by hand. */
async function assertServerHealthy(srv: TestServer, bystander: RawConn, tag: string): Promise<void> {
  if (await haveTool('nbdinfo')) {
    const r = await run('nbdinfo', ['--size', srv.uri]);
    assert.equal(r.code, 0, `${tag}: nbdinfo: ${r.stderr}`);
    assert.equal(r.stdout.trim(), String(srv.device.size()));
  } else {
    const c = await RawConn.connect(srv.port);
    const n = await handshake(c);
    assert.equal(n.size, srv.device.size());
    c.destroy();
  }
  // The client connected before the abuse keeps working.
  const d = randomBytes(4096);
  request(bystander, P.NBD_CMD_WRITE, 900n, 4096, 4096, 0, d);
  assert.equal((await readReply(bystander)).error, 0, tag);
  request(bystander, P.NBD_CMD_READ, 901n, 4096, 4096);
  const r = await readReply(bystander, () => 4096);
  assert.deepEqual(r.data, d, tag);
}

test('protocol abuse closes only the offending connection', async () => {
  const srv = await startServer(8 * MiB, { maxBlock: 1 * MiB });
  try {
    const bystander = await RawConn.connect(srv.port);
    await handshake(bystander);

    // 1. Garbage instead of a handshake.
    {
      const c = await RawConn.connect(srv.port);
      c.write(randomBytes(300));
      assert.ok(await c.waitClosed(), 'garbage handshake closes');
      await assertServerHealthy(srv, bystander, 'garbage');
    }
    // 1b. Garbage after valid client flags, where an option header belongs.
    {
      const c = await RawConn.connect(srv.port);
      await readGreeting(c);
      c.write(P.encodeClientFlags(1));
      c.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
      assert.ok(await c.waitClosed());
      await assertServerHealthy(srv, bystander, 'garbage option');
    }
    // 1c. An option claiming a huge payload.
    {
      const c = await RawConn.connect(srv.port);
      await readGreeting(c);
      c.write(P.encodeClientFlags(1));
      const h = P.encodeOption(P.NBD_OPT_GO);
      h.writeUInt32BE(0xfffffff0, 12);
      c.write(h);
      assert.ok(await c.waitClosed());
      await assertServerHealthy(srv, bystander, 'huge option');
    }
    // 2. A truncated request, then the client closes.
    {
      const c = await RawConn.connect(srv.port);
      await handshake(c);
      c.write(P.encodeRequestHeader({ type: P.NBD_CMD_READ, flags: 0, handle: 1n, offset: 0, length: 512 }).subarray(0, 13));
      await new Promise((r) => setTimeout(r, 20));
      c.socket.end();
      assert.ok(await c.waitClosed());
      await assertServerHealthy(srv, bystander, 'truncated');
    }
    // 3. WRITE above the maximum: EINVAL, payload skipped, connection still in sync.
    {
      const c = await RawConn.connect(srv.port);
      await handshake(c);
      request(c, P.NBD_CMD_WRITE, 10n, 0, 2 * MiB, 0, Buffer.alloc(2 * MiB, 0xff));
      request(c, P.NBD_CMD_READ, 11n, 0, 512);
      const r1 = await readReply(c, () => 512);
      assert.deepEqual([r1.handle, r1.error], [10n, P.NBD_EINVAL]);
      const r2 = await readReply(c, () => 512);
      assert.deepEqual([r2.handle, r2.error], [11n, 0]);
      assert.notEqual(r2.data![0], 0xff, 'the oversized payload was not written');
      // Beyond the discard limit the server answers, then hangs up.
      request(c, P.NBD_CMD_WRITE, 12n, 0, 0x80000000);
      const r3 = await readReply(c);
      assert.deepEqual([r3.handle, r3.error], [12n, P.NBD_EINVAL]);
      assert.ok(await c.waitClosed());
      await assertServerHealthy(srv, bystander, 'oversized write');
    }
    // 4. Disconnecting mid-request: half a WRITE payload, and reads whose replies have nowhere to go.
    {
      const c = await RawConn.connect(srv.port);
      await handshake(c);
      request(c, P.NBD_CMD_WRITE, 20n, 0, 65536, 0, Buffer.alloc(65536, 1).subarray(0, 30000) as Buffer);
      await new Promise((r) => setTimeout(r, 20));
      c.destroy();
      srv.device.faults.delay = (op) => (op === 'read' ? 30 : 0);
      const d = await RawConn.connect(srv.port);
      await handshake(d);
      for (let i = 0; i < 50; i++) request(d, P.NBD_CMD_READ, BigInt(i), 0, 256 * 1024);
      await new Promise((r) => setTimeout(r, 10));
      d.socket.resetAndDestroy();
      await new Promise((r) => setTimeout(r, 80));
      srv.device.faults = {};
      await assertServerHealthy(srv, bystander, 'disconnect mid-request');
    }
    // 5. Bad request magic: in-flight work still gets its reply, then the connection closes.
    {
      srv.device.faults.delay = (op) => (op === 'read' ? 50 : 0);
      const c = await RawConn.connect(srv.port);
      await handshake(c);
      request(c, P.NBD_CMD_READ, 30n, 0, 512);
      const junk = P.encodeRequestHeader({ type: P.NBD_CMD_READ, flags: 0, handle: 31n, offset: 0, length: 512 });
      junk.writeUInt32BE(0xdeadbeef, 0);
      c.write(junk);
      const r = await readReply(c, () => 512);
      assert.deepEqual([r.handle, r.error, r.data?.length], [30n, 0, 512]);
      assert.ok(await c.waitClosed());
      srv.device.faults = {};
      await assertServerHealthy(srv, bystander, 'bad magic');
    }
    const st = srv.server.stats();
    assert.ok(st.protocolErrors >= 5, `protocolErrors ${st.protocolErrors}`);
    assert.equal(st.connectionsActive, 1, 'only the bystander is left');
    bystander.destroy();
  } finally {
    await srv.close();
  }
});

test('many concurrent connections share one device (multi-conn)', async () => {
  const srv = await startServer(16 * MiB);
  try {
    const N = 8;
    const conns = await Promise.all(Array.from({ length: N }, () => RawConn.connect(srv.port)));
    await Promise.all(conns.map((c, i) => handshake(c, { structured: i % 2 === 0 })));
    assert.equal(srv.server.stats().connectionsActive, N);
    const blocks = conns.map(() => randomBytes(256 * 1024));
    // Each connection writes its own region as 64 pipelined 4 KiB writes, all at once.
    await Promise.all(
      conns.map(async (c, i) => {
        const wire: Buffer[] = [];
        for (let k = 0; k < 64; k++) {
          wire.push(
            P.encodeRequestHeader({ type: P.NBD_CMD_WRITE, flags: 0, handle: BigInt(k), offset: i * MiB + k * 4096, length: 4096 }),
            blocks[i]!.subarray(k * 4096, (k + 1) * 4096),
          );
        }
        c.write(Buffer.concat(wire));
        const seen = new Set<bigint>();
        for (let k = 0; k < 64; k++) {
          const r = await readReply(c);
          assert.equal(r.error, 0);
          seen.add(r.handle);
        }
        assert.equal(seen.size, 64);
        request(c, P.NBD_CMD_FLUSH, 99n, 0, 0);
        assert.equal((await readReply(c)).error, 0);
      }),
    );
    // Every connection sees every other connection's data.
    await Promise.all(
      conns.map(async (c, i) => {
        const j = (i + 3) % N;
        request(c, P.NBD_CMD_READ, 500n, j * MiB, 256 * 1024);
        const r = await readReply(c, () => 256 * 1024);
        assert.deepEqual(r.data, blocks[j]);
      }),
    );
    for (const c of conns) c.destroy();
    await Promise.all(conns.map((c) => c.closed));
  } finally {
    await srv.close();
  }
});

test('graceful close answers in-flight requests first; force close does not wait', async () => {
  const device = new MemoryDevice(1 * MiB);
  const server = createNbdServer({ device });
  const { port } = await server.listenTcp('127.0.0.1', 0);
  device.faults.delay = (op) => (op === 'read' ? 200 : 0);
  const c = await RawConn.connect(port);
  await handshake(c);
  request(c, P.NBD_CMD_READ, 1n, 0, 4096);
  await new Promise((r) => setTimeout(r, 30));
  const closing = server.close();
  const r = await readReply(c, () => 4096);
  assert.deepEqual([r.handle, r.error, r.data?.length], [1n, 0, 4096]);
  assert.ok(await c.waitClosed());
  await closing;
  await assert.rejects(RawConn.connect(port), /ECONNREFUSED/);

  const device2 = new MemoryDevice(1 * MiB);
  const server2 = createNbdServer({ device: device2 });
  const port2 = (await server2.listenTcp('127.0.0.1', 0)).port;
  const d = await RawConn.connect(port2);
  await handshake(d);
  device2.faults.delay = () => 1500;
  request(d, P.NBD_CMD_READ, 1n, 0, 4096);
  await new Promise((r) => setTimeout(r, 30));
  const t0 = Date.now();
  let settled = false;
  const closed = server2.close({ force: true }).then(() => (settled = true));
  assert.ok(await d.waitClosed(1000), 'socket destroyed without waiting for the device');
  assert.equal(settled, false, 'close() still waits for the device call it started');
  await closed;
  assert.ok(Date.now() - t0 >= 1300);
  assert.equal(device2.calls.read, 1);
});

test('unix socket listener, including over a stale socket file', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-nbd-'));
  const sock = path.join(dir, 'nbd.sock');
  // Leave a dead socket file behind, as a crashed server would.
  const child = spawn(process.execPath, [
    '-e',
    `require('net').createServer().listen(${JSON.stringify(sock)}, () => console.log('up'))`,
  ]);
  await once(child.stdout, 'data');
  child.kill('SIGKILL');
  await once(child, 'exit');
  assert.ok(fs.lstatSync(sock).isSocket());

  const device = new MemoryDevice(2 * MiB);
  const server = createNbdServer({ device, exportName: 'u' });
  try {
    await server.listenUnix(sock);
    const c = await RawConn.connectUnix(sock);
    const n = await handshake(c, { name: 'u' });
    assert.equal(n.size, 2 * MiB);
    request(c, P.NBD_CMD_WRITE, 1n, 0, 512, 0, Buffer.alloc(512, 9));
    assert.equal((await readReply(c)).error, 0);
    c.destroy();
    // A live socket is never taken over.
    const other = createNbdServer({ device });
    await assert.rejects(other.listenUnix(sock), /EADDRINUSE/);
    await other.close();
    if (await haveTool('nbdinfo')) {
      const r = await run('nbdinfo', ['--size', `nbd+unix:///u?socket=${sock}`]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), String(2 * MiB));
    } else {
      t.diagnostic('nbdinfo not installed: unix URI check skipped');
    }
  } finally {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('createNbdServer rejects bad maxBlock', () => {
  const device = new MemoryDevice(1 * MiB);
  assert.throws(() => createNbdServer({ device, maxBlock: 1000 }), RangeError);
  assert.throws(() => createNbdServer({ device, maxBlock: 512 }), RangeError);
  assert.throws(() => createNbdServer({ device, maxBlock: 2 ** 31 }), RangeError);
});

test('read errors with a simple reply carry no payload and keep the stream in sync', async () => {
  const srv = await startServer(1 * MiB);
  srv.device.faults.read = (off) => (off === 4096 ? ioError() : undefined);
  srv.device.data.fill(0x61);
  try {
    const c = await RawConn.connect(srv.port);
    await handshake(c, { structured: false });
    request(c, P.NBD_CMD_READ, 1n, 4096, 4096);
    request(c, P.NBD_CMD_READ, 2n, 0, 4096);
    const got = new Map<bigint, { error: number; data?: Buffer }>();
    for (let i = 0; i < 2; i++) {
      const r = await readReply(c, () => 4096);
      got.set(r.handle, r);
    }
    assert.equal(got.get(1n)!.error, P.NBD_EIO);
    assert.equal(got.get(1n)!.data, undefined);
    assert.deepEqual(got.get(2n)!.data, Buffer.alloc(4096, 0x61));
    c.destroy();
  } finally {
    await srv.close();
  }
});

test('backpressure: a flood of requests from a client that reads replies late', async () => {
  const srv = await startServer(64 * MiB);
  for (let i = 0; i < 64 * MiB; i += 4096) srv.device.data.writeUInt32BE(i, i);
  try {
    const c = await RawConn.connect(srv.port);
    await handshake(c, { structured: true });
    c.socket.pause(); // do not read replies yet
    const N = 2000; // 125 MiB of replies, well above what the server will queue unsent
    const wire: Buffer[] = [];
    for (let i = 0; i < N; i++) {
      wire.push(P.encodeRequestHeader({ type: P.NBD_CMD_READ, flags: 0, handle: BigInt(i), offset: (i % 1024) * 65536, length: 65536 }));
    }
    c.write(Buffer.concat(wire));
    await new Promise((r) => setTimeout(r, 300));
    // The server stopped taking requests rather than buffer all the replies it cannot send.
    assert.ok(srv.server.stats().requests.read < N, `read ${srv.server.stats().requests.read}`);
    c.socket.resume();
    const seen = new Set<bigint>();
    for (let i = 0; i < N; i++) {
      const r = await readReply(c);
      assert.equal(r.error, 0);
      const off = (Number(r.handle) % 1024) * 65536;
      assert.equal(r.data!.readUInt32BE(0), off);
      assert.equal(r.data!.readUInt32BE(61440), off + 61440);
      seen.add(r.handle);
    }
    assert.equal(seen.size, N);
    assert.equal(srv.server.stats().requests.read, N);
    c.destroy();
  } finally {
    await srv.close();
  }
});
