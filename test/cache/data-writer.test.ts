/**
 * Writes that arrive together reach the cache device as one vectored write per contiguous run;
 * each still resolves only after its own bytes are written, and a failed run fails every write
 * in it (and no other).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { DataWriter } from '../../src/cache/data-writer.js';
import { MemoryBacking } from '../../src/backing/memory.js';
import { MemoryMedium } from '../../src/media/memory.js';
import { CACHE_SIZE, MiB } from './helpers.js';

/** A memory medium that records each write call and can fail the ones a predicate picks. */
class RecordingMedium extends MemoryMedium {
  calls: Array<{ at: number; buffers: number; bytes: number }> = [];
  failAt: ((at: number) => boolean) | null = null;

  override async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const bufs = Buffer.isBuffer(data) ? [data] : data;
    this.calls.push({ at: offset, buffers: bufs.length, bytes: bufs.reduce((n, b) => n + b.length, 0) });
    if (this.failAt?.(offset)) throw Object.assign(new Error('injected write error'), { code: 'EIO' });
    await super.write(data, offset);
  }
}

test('writes issued together are gathered into one vectored write per contiguous run', async () => {
  const medium = new RecordingMedium(4 * MiB);
  const w = new DataWriter(medium);
  const block = (v: number): Buffer => Buffer.alloc(4096, v);
  // Two runs: 0..16 KiB (given out of order) and 64 KiB..72 KiB.
  const done = await Promise.all([w.write(block(2), 4096), w.write(block(1), 0), w.write(block(3), 8192), w.write(block(4), 12288), w.write(block(5), 65536), w.write(block(6), 69632)]);
  assert.equal(done.length, 6);
  assert.deepEqual(medium.calls, [
    { at: 0, buffers: 4, bytes: 16384 },
    { at: 65536, buffers: 2, bytes: 8192 },
  ]);
  const back = Buffer.alloc(16384);
  await medium.read(back, 0);
  for (let i = 0; i < 4; i++) assert.equal(back[i * 4096], i + 1, `block ${i} landed where it was asked`);
  // A write issued after those settled is a call of its own.
  medium.calls = [];
  await w.write(block(7), 16384);
  assert.deepEqual(medium.calls, [{ at: 16384, buffers: 1, bytes: 4096 }]);
});

test('a failed vectored write fails every write in its run, and only those', async () => {
  const medium = new RecordingMedium(4 * MiB);
  medium.failAt = (at) => at === 0;
  const w = new DataWriter(medium);
  const results = await Promise.allSettled([w.write(Buffer.alloc(4096), 0), w.write(Buffer.alloc(4096), 4096), w.write(Buffer.alloc(4096), 1 * MiB)]);
  assert.deepEqual(
    results.map((r) => r.status),
    ['rejected', 'rejected', 'fulfilled'],
  );
  assert.match(String((results[0] as PromiseRejectedResult).reason), /injected/);
});

test('the cache gathers concurrent writes at the data head and reads every one back', async () => {
  const medium = new RecordingMedium(CACHE_SIZE);
  const cache = await Cache.open(medium, new MemoryBacking(64 * MiB), { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  medium.calls = [];
  const n = 32;
  await Promise.all(Array.from({ length: n }, (_, i) => cache.write(i * 2 * 4096, Buffer.alloc(4096, i + 1))));
  const data = medium.calls.filter((c) => c.bytes >= 4096);
  assert.ok(data.length < n, `${n} writes issued together took ${data.length} cache device writes`);
  assert.equal(
    data.reduce((s, c) => s + c.bytes, 0),
    n * 4096,
  );
  for (let i = 0; i < n; i++) assert.equal((await cache.read(i * 2 * 4096, 4096))[100], i + 1);
  await cache.close();
});
