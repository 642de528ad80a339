/**
 * Ksets that queue up while a kset write waits for its sync are written as one batch after one
 * sync: every kset's end marker first, then the sync (the keys' data and the markers), then the
 * ksets. Without it, each would cost a sync of its own. What the batch wrote replays whole.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC } from '../../src/format/index.js';
import { seededRng } from '../helpers/rng.js';
import { CACHE_SIZE, GatedMedium, KiB, keepProcessAlive, MiB, ObservedMedium, pattern, StoreMedium } from './helpers.js';

keepProcessAlive();

const OPTS = { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 } as const;

test('ksets queued behind a sync are written after one sync together, and replay whole', async () => {
  const rng = seededRng(3);
  const store = new StoreMedium(CACHE_SIZE);
  const gated = new GatedMedium(store);
  // M: an end marker, K: a kset, in the order the log issues them.
  const logWrites: string[] = [];
  let watching = false;
  const medium = new ObservedMedium(gated, (ev) => {
    if (!watching || ev.op !== 'write') return;
    if (ev.data.length === KSET_HEADER_SIZE && ev.data.every((b) => b === 0)) logWrites.push('M');
    else if (ev.data.length >= 16 && ev.data.readBigUInt64LE(8) === KSET_MAGIC) logWrites.push('K');
  });
  const backing = new MemoryBacking(64 * MiB);
  const cache = await Cache.open(medium, backing, OPTS);
  watching = true;
  const syncs = gated.hold(() => true, ['flush']);
  const model = new Map<number, Buffer>();
  const write = async (i: number): Promise<void> => {
    const data = pattern(rng, 4 * KiB);
    model.set(i * 8 * KiB, data);
    await cache.write(i * 8 * KiB, data);
  };
  // The 128th key closes the first kset: its sync is held while two more ksets fill and close.
  for (let i = 0; i < KSET_KEYS_MAX; i++) await write(i);
  await syncs.waitParked(1);
  for (let i = KSET_KEYS_MAX; i < 3 * KSET_KEYS_MAX; i++) await write(i);
  syncs.release();
  await cache.flush();
  assert.deepEqual(logWrites, ['M', 'K', 'M', 'M', 'K', 'K'], 'the second and third ksets share one sync');
  await cache.close();

  const reopened = await Cache.open(store, new MemoryBacking(64 * MiB), OPTS);
  assert.equal(reopened.status().indexKeys, 3 * KSET_KEYS_MAX, 'every key of the three ksets replays');
  for (const [off, data] of model) assert.ok((await reopened.read(off, data.length)).equals(data), `data at ${off}`);
  await reopened.close();
});
