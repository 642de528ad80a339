/**
 * The write-back pipeline (issue 11), watched on a backing device that parks chosen I/O:
 * - keys adjacent on the backing device go out as one write (up to 1 MiB), larger keys are cut;
 * - every write of a kset is in flight at once, not a fixed few;
 * - what write-back holds is bounded by bytes: with 4 MiB keys no more than WB_BYTES_IN_FLIGHT
 *   of them is read and in flight;
 * - while the backing flush of one kset is held, the next ksets are decoded and their data read
 *   ahead, but none of their backing writes starts; once it completes, everything drains intact;
 * - over nbdkit with multi-conn, write-back's writes are spread over every connection.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { openNbdBacking } from '../../src/backing/nbd.js';
import { Cache } from '../../src/cache/cache.js';
import { planWrites, WB_BYTES_IN_FLIGHT, WB_WRITE_MAX } from '../../src/cache/writeback.js';
import { KEY_FLAG_CLEAN } from '../../src/format/index.js';
import { startNbdkit } from '../helpers/nbd-servers.js';
import { sparseFile } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { seededRng } from '../helpers/rng.js';
import { haveTool } from '../nbd/helpers.js';
import { CACHE_SIZE, KiB, keepProcessAlive, MiB, pattern, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 256 * MiB;
const OPTS = { writebackIntervalMs: 20, ksetCloseMs: 60_000 } as const;

test('planWrites merges keys that meet end to end up to 1 MiB, cuts larger keys, and reads cache-contiguous pieces at once', () => {
  const key = (off: number, len: number, seg: number, segOff: number, flags = 0) => ({ off, len, flags, seg, segOff });
  const jobs = planWrites([
    key(0, 4 * KiB, 1, 0),
    key(4 * KiB, 4 * KiB, 1, 4 * KiB), // meets the one before, on the device and in the cache
    key(8 * KiB, 4 * KiB, 2, 0), // meets on the device only
    key(12 * KiB, 4 * KiB, 2, 4 * KiB, KEY_FLAG_CLEAN), // clean: not written, breaks the run
    key(16 * KiB, 4 * KiB, 2, 8 * KiB),
    key(MiB, 2.5 * MiB, 3, 0), // cut into 1 MiB writes
    key(3.5 * MiB, 8 * KiB, 3, 2.5 * MiB), // meets the cut key's last write, which has room
  ]);
  assert.deepEqual(
    jobs.map((j) => [j.off, j.len, j.pieces.map((p) => [p.seg, p.segOff, p.len, p.at])]),
    [
      [0, 12 * KiB, [[1, 0, 8 * KiB, 0], [2, 0, 4 * KiB, 8 * KiB]]],
      [16 * KiB, 4 * KiB, [[2, 8 * KiB, 4 * KiB, 0]]],
      [MiB, MiB, [[3, 0, MiB, 0]]],
      [2 * MiB, MiB, [[3, MiB, MiB, 0]]],
      [3 * MiB, 0.5 * MiB + 8 * KiB, [[3, 2 * MiB, 0.5 * MiB + 8 * KiB, 0]]],
    ],
  );
  assert.ok(jobs.every((j) => j.len <= WB_WRITE_MAX));
  // A run longer than 1 MiB of small keys is cut at 1 MiB.
  const run = planWrites(Array.from({ length: 300 }, (_, i) => key(i * 4 * KiB, 4 * KiB, 0, i * 4 * KiB)));
  assert.deepEqual(
    run.map((j) => j.len),
    [MiB, 300 * 4 * KiB - MiB],
  );
});

test('every write of a kset is in flight at once', async () => {
  const rng = seededRng(11);
  const medium = new StoreMedium(CACHE_SIZE);
  const backing = new MemoryBacking(BACKING_SIZE);
  const hold = backing.hold(() => true, ['write']);
  const cache = await Cache.open(medium, backing, OPTS);
  // 120 keys of 4 KiB, none adjacent: 120 backing writes.
  const model = new Map<number, Buffer>();
  for (let i = 0; i < 120; i++) {
    const off = (2 * i + 1) * 64 * KiB + rng.int(8) * 4 * KiB;
    const data = pattern(rng, 4 * KiB);
    model.set(off, data);
    await cache.write(off, data);
  }
  await cache.flush();
  await hold.waitParked(120);
  assert.equal(hold.parked, 120, 'all 120 writes of the kset are in flight together');
  hold.release();
  await cache.drain({ maxErrors: 0 });
  const img = backing.image();
  for (const [off, data] of model) assert.ok(img.subarray(off, off + data.length).equals(data), `backing at ${off}`);
  await cache.close();
});

test('write-back holds at most WB_BYTES_IN_FLIGHT of data: 4 MiB keys wait for room', async () => {
  const rng = seededRng(12);
  const medium = new StoreMedium(CACHE_SIZE);
  const backing = new MemoryBacking(BACKING_SIZE);
  const hold = backing.hold(() => true, ['write']);
  const cache = await Cache.open(medium, backing, OPTS);
  const keys = 24; // 96 MiB in one kset, 3 times the budget
  const model: Buffer[] = [];
  for (let i = 0; i < keys; i++) {
    model.push(pattern(rng, 4 * MiB));
    // Every other 4 MiB block: keys never meet, each is cut into 1 MiB writes.
    await cache.write(i * 8 * MiB, model[i]!);
  }
  await cache.flush();
  const budgetWrites = WB_BYTES_IN_FLIGHT / WB_WRITE_MAX;
  await hold.waitParked(budgetWrites);
  // Let anything that could still start do so.
  await new Promise((r) => setTimeout(r, 200));
  const st = cache.status().counters;
  assert.equal(hold.parked, budgetWrites, `${hold.parked} backing writes in flight, the budget allows ${budgetWrites}`);
  assert.equal(st.writebackBytesHeld, WB_BYTES_IN_FLIGHT);
  hold.release();
  await cache.drain({ maxErrors: 0 });
  assert.equal(cache.status().counters.writebackBytesHeld, 0, 'every byte held is given back');
  const img = backing.image();
  for (let i = 0; i < keys; i++) assert.ok(img.subarray(i * 8 * MiB, i * 8 * MiB + 4 * MiB).equals(model[i]!), `key ${i}`);
  await cache.close();
});

test('while a kset’s backing flush is held, the next ksets are read ahead, and none of their writes starts', async () => {
  const rng = seededRng(13);
  const medium = new StoreMedium(CACHE_SIZE);
  let writes = 0;
  const backing = new MemoryBacking(BACKING_SIZE, { onOp: (op) => void (op.op === 'write' && writes++) });
  const flushHold = backing.hold(() => true, ['flush']);
  const cache = await Cache.open(medium, backing, OPTS);
  const model = Buffer.alloc(BACKING_SIZE);
  // Four ksets of 10 keys each, none adjacent: 40 backing writes in all.
  for (let k = 0; k < 4; k++) {
    for (let i = 0; i < 10; i++) {
      const off = (k * 10 + i) * 256 * KiB;
      const data = pattern(rng, 16 * KiB);
      data.copy(model, off);
      await cache.write(off, data);
    }
    await cache.flush();
  }
  await flushHold.waitParked(1);
  // The first kset is written, its flush held: the other three are decoded and their data read.
  await waitFor(() => cache.status().counters.writebackBytesHeld === 30 * 16 * KiB, 'the next ksets’ data to be read ahead');
  const st = cache.status().counters;
  assert.equal(st.writebackKsetsAhead, 3, 'three ksets decoded ahead of the one being flushed');
  assert.equal(writes, 10, 'only the first kset’s writes reached the backing device');
  flushHold.release();
  await cache.drain({ maxErrors: 0 });
  assert.equal(writes, 40);
  assert.ok(backing.image().equals(model), 'the backing device holds every write');
  assert.equal(cache.status().counters.writtenBackKsets, 4);
  await cache.close();
});

test('over nbdkit with multi-conn, write-back spreads its writes over every connection', async (t) => {
  if (!(await haveTool('nbdkit'))) return t.skip('nbdkit is not installed');
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 64 * MiB);
  const log = join(dir, 'nbdkit.log');
  // The log filter records each request with its connection; the delay keeps requests overlapping.
  const server = await startNbdkit(dir, ['--filter=log', '--filter=delay', 'file', disk, `logfile=${log}`, 'delay-write=5ms']);
  t.after(() => server.stop());
  const backing = await openNbdBacking(server.uri, { connections: 4 });
  assert.equal(backing.state().connections, 4, 'nbdkit file offers multi-conn: four connections');
  const rng = seededRng(14);
  const cache = await Cache.open(new StoreMedium(CACHE_SIZE), backing, OPTS);
  const model = new Map<number, Buffer>();
  for (let i = 0; i < 64; i++) {
    const off = i * 512 * KiB;
    const data = pattern(rng, 4 * KiB);
    model.set(off, data);
    await cache.write(off, data);
  }
  await cache.flush();
  await cache.drain({ maxErrors: 0 });
  await cache.close();
  await backing.close();
  const text = await readFile(log, 'utf8');
  const conns = new Set([...text.matchAll(/connection=(\d+) Write/g)].map((m) => m[1]));
  assert.equal(conns.size, 4, `writes came over ${conns.size} connections: ${[...conns].join(', ')}`);
  const img = await readFile(disk);
  for (const [off, data] of model) assert.ok(img.subarray(off, off + data.length).equals(data), `disk at ${off}`);
});
