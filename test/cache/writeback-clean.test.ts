/**
 * Write-back of ksets that hold only CLEAN fill keys writes nothing to the backing device, so it
 * issues no backing FLUSH (spec section 6: the flush orders a kset's backing writes; with none,
 * the backing state is unchanged). dirty_tail still passes them, durably: after a reopen it
 * stands at key_head. A dirty kset after clean ones still gets its one flush.
 */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { samePosition } from '../../src/format/index.js';
import { seededRng } from '../helpers/rng.js';
import { CACHE_SIZE, KiB, keepProcessAlive, MiB, pattern, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 64 * MiB;
// Ksets close 10 ms after their first key, so the fills below land in many small ksets.
const OPTS = { writebackIntervalMs: 20, ksetCloseMs: 10, sequentialCutoff: 0 } as const;

test('clean-only ksets cost no backing flush; dirty_tail passes them durably; a dirty kset after them is flushed once', async () => {
  const rng = seededRng(7);
  const medium = new StoreMedium(CACHE_SIZE);
  const backingImage = pattern(rng, BACKING_SIZE);
  let flushes = 0;
  let writes = 0;
  const backing = new MemoryBacking(Buffer.from(backingImage), {
    onOp: (op) => {
      if (op.op === 'flush') flushes++;
      if (op.op === 'write') writes++;
    },
  });
  const cache = await Cache.open(medium, backing, OPTS);
  // Misses far apart (never a sequential stream), paced so fills are never dropped.
  for (let i = 0; i < 40; i++) {
    const off = i * MiB + rng.int(64) * 4 * KiB;
    const got = await cache.read(off, 4 * KiB);
    assert.ok(got.equals(backingImage.subarray(off, off + 4 * KiB)), `read at ${off}`);
    await sleep(15);
  }
  await waitFor(() => cache.status().counters.fillBytes >= 40 * 4 * KiB, 'all 40 misses filled');
  await cache.flush();
  await cache.drain({ maxErrors: 0 });
  const cleanDone = cache.status();
  assert.ok(cleanDone.counters.writtenBackKsets > 1, `several clean ksets were passed (${cleanDone.counters.writtenBackKsets})`);
  assert.ok(samePosition(cleanDone.dirtyTail, cleanDone.keyHead), 'dirty_tail reached key_head');
  assert.equal(writes, 0, 'nothing was written to the backing device');
  assert.equal(flushes, 0, 'no backing flush for ksets with nothing to write');

  // A dirty kset after clean ones: one flush, and its data on the backing device.
  const data = pattern(rng, 8 * KiB);
  await cache.read(50 * MiB, 4 * KiB);
  await waitFor(() => cache.status().counters.fillBytes >= 41 * 4 * KiB, 'the last miss filled');
  await cache.flush();
  await cache.write(60 * MiB, data);
  await cache.flush();
  await cache.drain({ maxErrors: 0 });
  assert.equal(flushes, 1, 'one backing flush, for the kset that wrote');
  assert.ok(backing.image().subarray(60 * MiB, 60 * MiB + data.length).equals(data));
  const before = cache.status();
  await cache.close();

  // dirty_tail was persisted at key_head: a reopened cache has nothing to pass again.
  const reopened = await Cache.open(medium, new MemoryBacking(backing.image()), OPTS);
  const after = reopened.status();
  assert.ok(samePosition(after.dirtyTail, before.keyHead), `persisted dirty_tail ${JSON.stringify(after.dirtyTail)} is key_head ${JSON.stringify(before.keyHead)}`);
  assert.ok(samePosition(after.keyHead, before.keyHead));
  await reopened.close();
});
