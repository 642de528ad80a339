/**
 * Issue 13, finding 3 as the tester met it: a sparse cache file on a small tmpfs that fills up.
 * Before, every write failed from then on, even after a restart and gc_percent 0, with two
 * segments in use and nothing dirty. Now the cache goes on in the blocks its file already has:
 * qemu-io's writes and flushes succeed, and every flushed pattern reads back.
 *
 * Mounting a tmpfs needs root (CI runs as root); elsewhere the test says so and skips. The
 * engine-level test (test/cache/enospc.test.ts) covers the same behaviour everywhere.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe, type ServeProc } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

function mountTmpfs(dir: string, size: string): boolean {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

async function qemuIo(uri: string, cmds: string[]): Promise<{ ok: boolean; out: string }> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  const out = r.stdout + r.stderr;
  return { ok: r.code === 0 && !/error|failed/i.test(out), out };
}

test('a sparse cache on a full tmpfs keeps taking writes, across a restart with gc_percent 0', { timeout: 300_000 }, async (t) => {
  if (!(await haveTool('qemu-io'))) return t.skip('qemu-io is not installed');
  const dir = await tempDir();
  const mnt = join(dir, 'tmpfs');
  mkdirSync(mnt);
  if (process.getuid?.() !== 0 || !mountTmpfs(mnt, '200m')) return t.skip('mounting a tmpfs needs root');
  try {
    await fillAndRestart(dir, mnt);
  } finally {
    // Before tempDir's removal, which would otherwise find the mount busy.
    execFileSync('umount', [mnt]);
  }
});

async function fillAndRestart(dir: string, mnt: string): Promise<void> {
  const cache = await sparseFile(join(mnt, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 32 * MiB);
  const fmt = await runPcache(['format', '--sparse', cache]);
  assert.equal(fmt.code, 0, fmt.stderr);

  let srv: ServeProc = await startServe(dir, cache, backing);
  let round = 0;
  /** Writes the whole device with pattern `round`, flushes, reads it back. */
  const cycle = async (): Promise<{ ok: boolean; out: string }> => {
    round++;
    const p = `0x${(round & 0xff).toString(16)}`;
    const w = await qemuIo(srv.uri, [`write -P ${p} 0 32M`, 'flush']);
    if (!w.ok) return w;
    return qemuIo(srv.uri, [`read -P ${p} 0 32M`]);
  };
  try {
    // 12 rounds of 32 MiB: 384 MiB through a cache file on a 200 MiB filesystem.
    for (let i = 0; i < 12; i++) {
      const r = await cycle();
      assert.ok(r.ok, `round ${round}: ${r.out}`);
    }
    const fs = statfsSync(mnt);
    assert.ok(fs.bavail * fs.bsize < 8 * MiB, 'the tmpfs is full');
    const flushed = await runPcache(['flush', cache]);
    assert.equal(flushed.code, 0, flushed.stderr);
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  srv = await startServe(dir, cache, backing);
  try {
    const gc = await runPcache(['message', cache, 'gc_percent', '0']);
    assert.equal(gc.code, 0, gc.stderr);
    for (let i = 0; i < 6; i++) {
      const r = await cycle();
      assert.ok(r.ok, `after restart, round ${round}: ${r.out}`);
    }
  } finally {
    assert.equal(await srv.stop(), 0);
  }
  const check = await runPcache(['check', cache]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
}
