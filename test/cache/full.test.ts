/**
 * A full cache whose backing device is held: writes wait for space, never fail; status counts the
 * waiting writes; reads of cached data still work; releasing the backing device lets every write
 * complete, and the data is all there.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { samePosition } from '../../src/format/index.js';
import { CACHE_SIZE, FAST, keepProcessAlive, MiB, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 64 * MiB;
const WRITERS = 4;
const CHUNK = 4 * MiB;

test('writes wait, never fail, while the cache is full and the backing device is held', { timeout: 120_000 }, async () => {
  const medium = new StoreMedium(CACHE_SIZE);
  const backing = new MemoryBacking(BACKING_SIZE);
  const hold = backing.hold(() => true, ['write']);
  const cache = await Cache.open(medium, backing, FAST);

  // Each 4 MiB block of the device holds the number of the last write to it (its every byte).
  const lastWrite = new Array<number>(BACKING_SIZE / CHUNK).fill(0);
  let issued = 0;
  let completed = 0;
  const failures: unknown[] = [];
  const total = Math.ceil((1.5 * CACHE_SIZE) / CHUNK);
  const quarter = BACKING_SIZE / CHUNK / WRITERS;

  // Each writer owns a quarter of the device and writes it over and over, one write at a time.
  const writer = async (w: number): Promise<void> => {
    for (let i = 0; issued < total; i++) {
      const block = w * quarter + (i % quarter);
      const no = ++issued;
      try {
        await cache.write(block * CHUNK, Buffer.alloc(CHUNK, no & 0xff));
        lastWrite[block] = no;
        completed++;
      } catch (err) {
        failures.push(err);
        return;
      }
    }
  };
  const writers = Array.from({ length: WRITERS }, (_, w) => writer(w));

  // Every writer ends up waiting (one may still finish a write it had space for: wait for all).
  await waitFor(() => cache.status().counters.writesWaiting === WRITERS, 'every writer to wait for space');
  const stalledAt = completed;
  await sleep(300);
  const st = cache.status();
  assert.equal(failures.length, 0, 'no write failed');
  assert.equal(completed, stalledAt, 'no write completed while the cache is full and the backing held');
  assert.equal(st.counters.writesWaiting, WRITERS, 'status counts the waiting writes');
  assert.ok(st.segsUsed >= st.nSegs - 2, `the cache is full (${st.segsUsed} of ${st.nSegs} segments)`);
  assert.ok(hold.parked > 0, 'write-back is parked on the backing device');
  // Cached data still reads while writes wait.
  const block = lastWrite.findIndex((n) => n > 0);
  assert.ok((await cache.read(block * CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK, lastWrite[block]! & 0xff)));

  hold.release();
  await Promise.all(writers);
  assert.equal(failures.length, 0, `no write failed: ${failures.map(String).join('; ')}`);
  assert.ok(completed >= total);
  assert.equal(cache.status().counters.writesWaiting, 0);
  assert.ok(cache.status().counters.spaceWaits > 0);

  const check = async (read: (off: number) => Promise<Buffer>, what: string): Promise<void> => {
    for (let b = 0; b < lastWrite.length; b++) {
      assert.ok((await read(b * CHUNK)).equals(Buffer.alloc(CHUNK, lastWrite[b]! & 0xff)), `${what}: block ${b}`);
    }
  };
  await check((off) => cache.read(off, CHUNK), 'read through the cache');
  await cache.drain({ maxErrors: 0 });
  assert.ok(samePosition(cache.dirtyTail, cache.keyHead));
  await cache.close();
  const img = backing.image();
  await check(async (off) => img.subarray(off, off + CHUNK), 'the backing device after the drain');
});
