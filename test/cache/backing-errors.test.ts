/**
 * A failing backing device: write-back errors show in status, dirty_tail stays where it is (in
 * memory and on the medium), no kset is skipped, and once the device heals everything drains.
 * Reads that need the failing device reject; they never return zeros.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { CacheError } from '../../src/cache/errors.js';
import { loadMeta } from '../../src/cache/meta.js';
import { FormatError, formatPosition, samePosition, type Position } from '../../src/format/index.js';
import { seededRng } from '../helpers/rng.js';
import { CACHE_SIZE, FAST, keepProcessAlive, KiB, MiB, pattern, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 32 * MiB;

async function persistedDirtyTail(medium: StoreMedium): Promise<Position> {
  const meta = await loadMeta(medium);
  assert.ok(!(meta instanceof FormatError), String(meta));
  return { seg: meta.dirtyTail.seg, off: meta.dirtyTail.off };
}

for (const fault of ['writes', 'flushes'] as const) {
  test(`backing ${fault} failing: errors in status, dirty_tail stays, everything drains once it heals`, async () => {
    const rng = seededRng(11);
    const medium = new StoreMedium(CACHE_SIZE);
    const backing = new MemoryBacking(BACKING_SIZE);
    const cache = await Cache.open(medium, backing, FAST);
    const model = Buffer.alloc(BACKING_SIZE);
    const start = cache.dirtyTail;

    if (fault === 'writes') backing.failWrites(() => true);
    else backing.failFlushes(true);
    for (let i = 0; i < 6; i++) {
      const data = pattern(rng, 256 * KiB);
      const off = rng.int(BACKING_SIZE / (256 * KiB)) * 256 * KiB;
      await cache.write(off, data);
      data.copy(model, off);
      if (i % 2) await cache.flush();
    }
    await cache.flush();

    await waitFor(() => cache.status().counters.writebackErrors >= 2, 'write-back to fail and retry');
    const st = cache.status();
    assert.match(st.writebackError ?? '', /EIO/, `the error is shown: ${st.writebackError}`);
    assert.ok(samePosition(st.dirtyTail, start), `dirty_tail stays at ${formatPosition(start)}`);
    assert.ok(samePosition(await persistedDirtyTail(medium), start), 'and so does the persisted one');
    assert.ok(!samePosition(st.keyHead, start), 'while the log holds ksets to write back');
    assert.ok(st.counters.dirtyBytes > 0);
    // The cache keeps serving meanwhile.
    for (let off = 0; off < BACKING_SIZE; off += 4 * MiB) assert.ok((await cache.read(off, 4 * MiB)).equals(model.subarray(off, off + 4 * MiB)));

    if (fault === 'writes') backing.failWrites(null);
    else backing.failFlushes(false);
    await cache.drain();
    const done = cache.status();
    assert.equal(done.writebackError, null, 'the error clears once write-back succeeds');
    assert.ok(samePosition(done.dirtyTail, done.keyHead));
    assert.ok(samePosition(await persistedDirtyTail(medium), done.keyHead));
    assert.equal(done.counters.dirtyBytes, 0);
    assert.ok(backing.image().equals(model), 'the backing device got everything');
    await cache.close();
  });
}

test('a kset that fails to write back holds back every later one: none is skipped', async () => {
  const rng = seededRng(12);
  const medium = new StoreMedium(CACHE_SIZE);
  const backing = new MemoryBacking(BACKING_SIZE);
  const cache = await Cache.open(medium, backing, FAST);
  const a = pattern(rng, 64 * KiB);
  const b = pattern(rng, 64 * KiB);
  const start = cache.dirtyTail;
  // Only the range of A fails.
  backing.failWrites((off, len) => off < 2 * MiB + a.length && off + len > 2 * MiB);
  await cache.write(2 * MiB, a, { fua: true }); // its own kset, the first in the log
  await cache.write(8 * MiB, b, { fua: true }); // the next kset
  await waitFor(() => cache.status().counters.writebackErrors >= 2, 'the kset of A to fail twice');
  assert.ok(samePosition(cache.dirtyTail, start), `dirty_tail stays before the kset of A (${formatPosition(cache.dirtyTail)})`);
  assert.ok(backing.image().subarray(8 * MiB, 8 * MiB + b.length).equals(Buffer.alloc(b.length)), 'B, logged after A, is not written back before A');
  backing.failWrites(null);
  await cache.drain();
  const img = backing.image();
  assert.ok(img.subarray(2 * MiB, 2 * MiB + a.length).equals(a));
  assert.ok(img.subarray(8 * MiB, 8 * MiB + b.length).equals(b));
  await cache.close();
});

test('drain gives up after maxErrors failed attempts, with the error', async () => {
  const medium = new StoreMedium(CACHE_SIZE);
  const backing = new MemoryBacking(BACKING_SIZE);
  const cache = await Cache.open(medium, backing, FAST);
  await cache.write(0, Buffer.alloc(4096, 1));
  backing.failFlushes(true);
  await assert.rejects(cache.drain({ maxErrors: 1 }), (err: unknown) => err instanceof CacheError && /write-back failed: .*EIO/.test(err.message));
  backing.failFlushes(false);
  await cache.drain();
  await cache.close();
});

test('reads that need a failing backing device reject, never return zeros; cached data still reads', async () => {
  const rng = seededRng(13);
  const medium = new StoreMedium(CACHE_SIZE);
  const image = pattern(rng, BACKING_SIZE);
  const backing = new MemoryBacking(image);
  const cache = await Cache.open(medium, backing, FAST);
  const cached = pattern(rng, 64 * KiB);
  await cache.write(MiB, cached);

  backing.failReads(() => true);
  const isEio = (err: unknown): boolean => err instanceof Error && (err as { code?: string }).code === 'EIO';
  await assert.rejects(cache.read(4 * MiB, 64 * KiB), isEio, 'a miss rejects');
  await assert.rejects(cache.read(MiB - 4 * KiB, 72 * KiB), isEio, 'a partly cached range rejects');
  await assert.rejects(cache.read(4 * MiB, 64 * KiB), isEio, 'and again: no placeholder left behind');
  assert.ok((await cache.read(MiB, cached.length)).equals(cached), 'a hit needs no backing read');
  assert.ok(cache.status().counters.fillBytes === 0);

  backing.failReads(null);
  assert.ok((await cache.read(4 * MiB, 64 * KiB)).equals(image.subarray(4 * MiB, 4 * MiB + 64 * KiB)), 'healed: the miss reads the backing data');
  const mixed = Buffer.from(image.subarray(MiB - 4 * KiB, MiB + 68 * KiB));
  cached.copy(mixed, 4 * KiB);
  assert.ok((await cache.read(MiB - 4 * KiB, 72 * KiB)).equals(mixed));
  await sleep(10);
  await cache.close();
});
