/**
 * `pcache serve` as a process against hostile clients (finding 5 and 6 of issue 13), and its
 * flags for TLS, read-only, connection limits and the handshake timeout.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { parseServeArgs, serve } from '../../src/cli/serve.js';
import { DEFAULT_MAX_BLOCK, DEFAULT_TOTAL_QUEUE_BYTES } from '../../src/nbd/server.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { needTools, run } from '../nbd/helpers.js';
import { nonReadingClient, rssOf, silentClient } from '../nbd/hostile.js';
import { makePskFile } from '../nbd/tls-fixtures.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

test('12 clients pipelining 32 MiB reads and reading nothing: RSS stays bounded (it reached 3.5 GiB), and comes back when they leave', async () => {
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const srv = await startServe(dir, cache, backing);
  const pid = srv.proc.pid!;
  try {
    const base = rssOf(pid);
    // What the server may hold (1.5 times the shared budget plus one request), one more
    // request's copy on the read path, and 128 MiB for the runtime's own growth.
    const bound = base + 1.5 * DEFAULT_TOTAL_QUEUE_BYTES + 2 * DEFAULT_MAX_BLOCK + 128 * MiB;
    const clients = [];
    for (let i = 0; i < 12; i++) clients.push(await nonReadingClient({ path: srv.socket }, 32, 32 * MiB));
    let peak = 0;
    for (let i = 0; i < 40; i++) {
      await sleep(150);
      peak = Math.max(peak, rssOf(pid));
    }
    assert.ok(peak < bound, `RSS peaked at ${Math.round(peak / MiB)} MiB, bound ${Math.round(bound / MiB)} MiB (start ${Math.round(base / MiB)} MiB)`);
    assert.ok(peak > base + 128 * MiB, `the clients did load the server (peak ${Math.round(peak / MiB)} MiB)`);

    for (const c of clients) c.destroy();
    let after = rssOf(pid);
    for (let i = 0; i < 50 && after > base + 96 * MiB; i++) {
      await sleep(200);
      after = rssOf(pid);
    }
    assert.ok(after <= base + 96 * MiB, `RSS ${Math.round(after / MiB)} MiB after the clients left (start ${Math.round(base / MiB)} MiB)`);
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 1M', '-c', 'read -P 0x21 0 1M', srv.uri]).catch(() => null);
    if (r) assert.equal(r.code, 0, r.stdout + r.stderr);
  } finally {
    await srv.stop();
  }
});

test('pcache serve --read-only --max-connections --handshake-timeout', async (t) => {
  if (!(await needTools(t, 'nbdinfo'))) return;
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 16 * MiB);
  const srv = await startServe(dir, cache, backing, [], ['--read-only', '--max-connections', '3', '--handshake-timeout', '0.5']);
  try {
    const info = await run('nbdinfo', ['--json', srv.uri]);
    assert.equal(info.code, 0, info.stderr);
    assert.equal(JSON.parse(info.stdout).exports[0].is_read_only, true);
    if (await needTools(t, 'qemu-io')) {
      const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', srv.uri]);
      assert.match(w.stdout + w.stderr, /read-only|Operation not permitted|Permission denied/i);
    }
    const silent = await silentClient({ path: srv.socket });
    const started = Date.now();
    await Promise.race([silent.closed, sleep(5000).then(() => assert.fail('not dropped after --handshake-timeout 0.5'))]);
    assert.ok(Date.now() - started < 4000);
  } finally {
    await srv.stop();
  }
});

test('serve flags: bad values are usage errors; TLS files are checked before any device is opened; non-loopback warns', async () => {
  assert.throws(() => parseServeArgs(['--tls', 'maybe']), /--tls takes off, on or require/);
  assert.throws(() => parseServeArgs(['--handshake-timeout', '0']), /--handshake-timeout takes seconds/);
  assert.throws(() => parseServeArgs(['--max-connections', '0']), /--max-connections must be an integer/);
  const cfg = parseServeArgs(['c.img', 'b.img', '--tls', 'require', '--tls-psk', '/k.psk', '--read-only', '--max-connections', '5', '--handshake-timeout', '2.5']);
  assert.deepEqual(cfg.tls, { mode: 'require', pskFile: '/k.psk' });
  assert.equal(cfg.readOnly, true);
  assert.equal(cfg.maxConnections, 5);
  assert.equal(cfg.handshakeTimeoutMs, 2500);

  const dir = await tempDir();
  const io = { out: (): void => {}, err: (): void => {} };
  // Neither device exists: the TLS error comes first.
  await assert.rejects(serve(parseServeArgs([join(dir, 'none.img'), join(dir, 'none2.img'), '--tls', 'require']), io), /--tls require needs --tls-psk FILE or --tls-certificates DIR/);
  await assert.rejects(serve(parseServeArgs([join(dir, 'none.img'), join(dir, 'none2.img'), '--tls', 'on', '--tls-psk', join(dir, 'missing.psk')]), io), /cannot read the PSK file .*missing.psk: ENOENT/);

  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 16 * MiB);
  const { file } = makePskFile(join(dir, 'psk'), ['alice']);
  for (const [extra, warns] of [
    [[], true],
    [['--tls', 'on', '--tls-psk', file], true],
    [['--tls', 'require', '--tls-psk', file], false],
  ] as const) {
    let err = '';
    const s = await serve(parseServeArgs([cache, backing, '--listen', '0.0.0.0:0', ...extra]), { out: () => {}, err: (x) => void (err += x) });
    s.stop(false);
    await s.stopped;
    if (warns) assert.match(err, /warning: listening on 0\.0\.0\.0:\d+ (without TLS|with TLS optional)/, err);
    else assert.doesNotMatch(err, /warning/);
    if (!warns) assert.match(s.uri, /^nbds:\/\//);
  }
  let loopErr = '';
  const s = await serve(parseServeArgs([cache, backing, '--listen', '127.0.0.1:0']), { out: () => {}, err: (x) => void (loopErr += x) });
  s.stop(false);
  await s.stopped;
  assert.doesNotMatch(loopErr, /warning/);
});
