/**
 * Finding 3 of issue 13: a sparse cache file on a filesystem that fills up. Writes that need new
 * blocks fail with ENOSPC and the client sees the error; nothing flushed is lost; and the cache is
 * never wedged: it goes on in the segments whose blocks it already has, and once the filesystem
 * has room again every write succeeds, before and after a restart.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { samePosition } from '../../src/format/index.js';
import { FullFsMedium } from '../../src/media/full-fs.js';
import { FAST, keepProcessAlive, MiB, waitFor } from './helpers.js';

keepProcessAlive();

const CACHE = 512 * MiB;
const BACKING = 32 * MiB;
const CHUNK = MiB;

function block(n: number): Buffer {
  return Buffer.alloc(CHUNK, n & 0xff).fill(n >> 8, 0, 4);
}

/** Writes `count` chunks round the backing device, with a flush every 8; the errors seen. */
async function writeRound(cache: Cache, first: number, count: number, model: Map<number, number>): Promise<string[]> {
  const errors: string[] = [];
  const slots = BACKING / CHUNK;
  const pending = new Map<number, number>();
  for (let n = first; n < first + count; n++) {
    const slot = n % slots;
    try {
      await cache.write(slot * CHUNK, block(n));
      pending.set(slot, n);
    } catch (err) {
      errors.push((err as NodeJS.ErrnoException).code ?? String(err));
    }
    if ((n + 1) % 8 === 0) {
      try {
        await cache.flush();
        for (const [s, v] of pending) model.set(s, v);
        pending.clear();
      } catch (err) {
        errors.push(`flush ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
      }
    }
  }
  return errors;
}

async function clean(cache: Cache): Promise<void> {
  await cache.drain();
  await waitFor(() => samePosition(cache.status().dirtyTail, cache.status().keyHead), 'write-back to finish');
}

async function verify(cache: Cache, model: Map<number, number>): Promise<void> {
  for (const [slot, n] of model) {
    const got = await cache.read(slot * CHUNK, CHUNK);
    // Not the last write attempted: the last one acknowledged and flushed, or a later one.
    assert.ok(got.subarray(4).every((b) => b === got[4]), `slot ${slot}: a torn chunk`);
    assert.ok(got.readUInt32LE(0) >= 0, `slot ${slot}`);
    const stored = (got.readUInt32LE(0) & 0xff) * 256 + got[4]!;
    assert.ok(stored >= n, `slot ${slot}: flushed write ${n} lost (holds ${stored})`);
  }
}

test('a full filesystem under a sparse cache file never wedges the cache', { timeout: 180_000 }, async () => {
  const medium = new FullFsMedium(CACHE, 200 * MiB, 'sparse cache.img on a full filesystem');
  const backing = new MemoryBacking(BACKING);
  const model = new Map<number, number>();
  let cache = await Cache.open(medium, backing, { ...FAST, gcPercent: 10, spaceRetryMs: 200 });

  // Fill the filesystem. The cache meets ENOSPC and goes on in the segments it has blocks for
  // (writes wait for write-back and GC to free one, as in a full cache): no error at all.
  let next = 0;
  const first = await writeRound(cache, next, 320, model);
  next += 320;
  assert.ok(medium.enospc > 0, 'the filesystem filled up');
  assert.deepEqual(first, []);
  await clean(cache);
  await verify(cache, model);

  // Still full: the cache goes on in the blocks it already has.
  medium.setFree(0);
  const whileFull = await writeRound(cache, next, 400, model);
  next += 400;
  assert.deepEqual(whileFull, [], 'writes in the blocks the cache file already has succeed');
  await clean(cache);
  await verify(cache, model);

  // After a restart too, with gc_percent 0 as the tester had it.
  await cache.close();
  cache = await Cache.open(medium, backing, { ...FAST, spaceRetryMs: 200 });
  await cache.setGcPercent(0);
  const afterRestart = await writeRound(cache, next, 400, model);
  next += 400;
  assert.deepEqual(afterRestart, [], 'after a restart');
  await clean(cache);
  await verify(cache, model);

  // Room again: every write succeeds.
  medium.setFree(CACHE);
  assert.deepEqual(await writeRound(cache, next, 200, model), []);
  await clean(cache);
  await verify(cache, model);
  await cache.close();
});

test('with no segment it can use, a write fails with ENOSPC at once, and succeeds once there is room', { timeout: 60_000 }, async () => {
  // A fresh sparse cache whose filesystem filled up right after the format.
  const medium = new FullFsMedium(CACHE, CACHE, 'fresh sparse cache.img');
  const backing = new MemoryBacking(BACKING);
  const cache = await Cache.open(medium, backing, { ...FAST, spaceRetryMs: 200 });
  medium.setFree(0);
  await assert.rejects(cache.write(0, block(1)), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'ENOSPC');
    assert.match(err.message, /cache device write failed: .*no space left/i);
    return true;
  });
  const model = new Map<number, number>();
  medium.setFree(CACHE);
  // Give the retry timer its turn: the segments tried while full are handed out again.
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(await writeRound(cache, 2, 64, model), []);
  await clean(cache);
  await verify(cache, model);
  await cache.close();
});
