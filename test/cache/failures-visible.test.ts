/**
 * Finding 8 of issue 13 (engine side): with the backing device failing, write-back retries
 * silently. Now each failure is logged (rate-limited, with dirty_tail and the errno, as dm-pcache's
 * "writeback error: %d") and the last one is kept, with its time, for `pcache stats`, also after
 * write-back has recovered.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { describeFailure } from '../../src/cache/failures.js';
import { formatPosition } from '../../src/format/index.js';
import { createLogger } from '../../src/log.js';
import { CACHE_SIZE, FAST, keepProcessAlive, MiB, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

test('write-back errors are logged with dirty_tail and errno, rate-limited, and kept for stats', { timeout: 60_000 }, async () => {
  const lines: string[] = [];
  const logger = createLogger({ format: 'json', write: (l) => void lines.push(l) });
  const backing = new MemoryBacking(16 * MiB);
  const cache = await Cache.open(new StoreMedium(CACHE_SIZE), backing, { ...FAST, logger });
  assert.equal(cache.status().writebackLastError, null);
  backing.failWrites(() => true);
  await cache.write(0, Buffer.alloc(64 * 1024, 7));
  await cache.flush();
  await waitFor(() => cache.status().counters.writebackErrors >= 3, 'three failed write-back attempts');

  const records = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
  const wb = records.filter((r) => r.event === 'writeback_error');
  // Rate-limited: three or more failures, one line (the next one would come 10 s later).
  assert.equal(wb.length, 1, lines.join(''));
  assert.equal(wb[0]!.level, 'error');
  assert.match(String(wb[0]!.msg), /^writeback error: -5 \(EIO\): /);
  assert.equal(wb[0]!.errno, 'EIO');
  const st = cache.status();
  assert.equal(wb[0]!.dirty_tail, formatPosition(st.dirtyTail));

  const note = st.writebackLastError!;
  assert.equal(note.errno, 'EIO');
  assert.equal(note.position, `dirty_tail ${formatPosition(st.dirtyTail)}`);
  assert.ok(note.count >= 3);
  assert.ok(Math.abs(Date.parse(note.at) - Date.now()) < 30_000, note.at);
  assert.match(describeFailure(note), /^\S+Z EIO at dirty_tail \d+:\d+: .* \(\d+ so far\)$/);

  // Recovered: the live error clears, the last one stays for whoever looks later.
  backing.failWrites(null);
  await cache.drain();
  assert.equal(cache.status().writebackError, null);
  assert.equal(cache.status().writebackLastError?.errno, 'EIO');
  assert.equal(cache.status().gcLastError, null);
  await cache.close();
});
