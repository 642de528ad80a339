/**
 * sequential_cutoff, a pcache extension: the serve flag, the message, the stats, and a real client's
 * sequential stream not churning the cache; dm-pcache's own status and table lines stay as they are.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

interface Stats {
  sequentialCutoff: number;
  counters: { fillBytes: number; sequentialSkippedBytes: number; readMissBytes: number };
}

async function stats(cache: string): Promise<Stats> {
  const r = await runPcache(['stats', cache, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as Stats;
}

test('a bad --sequential-cutoff is refused before any device is touched', async () => {
  for (const bad of ['4X', '-1', 'lots', '']) {
    const r = await runPcache(['serve', 'no-such-cache', 'no-such-backing', '--sequential-cutoff', bad]);
    assert.notEqual(r.code, 0, bad);
    assert.match(r.stderr, /--sequential-cutoff must be a size in bytes/, `${bad}: ${r.stderr}`);
  }
});

test('--sequential-cutoff, the sequential_cutoff message and stats; a long sequential read is not filled past the cutoff', async (t) => {
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const srv = await startServe(dir, cache, backing, [], ['--sequential-cutoff', '2M']);
  try {
    assert.equal((await stats(cache)).sequentialCutoff, 2 * MiB);
    const text = await runPcache(['stats', cache]);
    assert.match(text.stdout, /^sequentialCutoff: 2097152$/m);
    assert.match(text.stdout, /^sequentialSkippedBytes: 0$/m);

    for (const bad of [['sequential_cutoff', '-1'], ['sequential_cutoff', 'x'], ['sequential_cutoff'], ['sequential_cutoff', '1', '2'], ['sequential_cutof', '1']]) {
      const r = await runPcache(['message', cache, ...bad]);
      assert.notEqual(r.code, 0, bad.join(' '));
      assert.match(r.stderr, /Invalid argument/);
    }
    assert.equal((await stats(cache)).sequentialCutoff, 2 * MiB, 'a refused message changes nothing');
    const off = await runPcache(['message', cache, 'sequential_cutoff', '0']);
    assert.equal(off.code, 0, off.stderr);
    assert.equal((await stats(cache)).sequentialCutoff, 0);
    const four = await runPcache(['message', cache, 'Sequential_Cutoff', '4M']);
    assert.equal(four.code, 0, four.stderr);
    assert.equal((await stats(cache)).sequentialCutoff, 4 * MiB);

    // dm-pcache's lines are untouched by the extension.
    assert.match((await runPcache(['status', cache])).stdout, /^0 131072 pcache 0 31 31 \d+ 70 \S+ \d+:\d+ \d+:\d+ \d+:\d+\n$/);
    assert.equal((await runPcache(['table', cache])).stdout, `0 131072 pcache ${cache} ${backing} 4 cache_mode writeback crc false\n`);

    if (!(await haveTool('fio'))) return t.skip('fio is not installed (the sequential read through a real client)');
    // 16 MiB read sequentially, 1 MiB at a time: the first 4 MiB are filled, the rest are not.
    const r = await run('fio', ['--name=seq', '--ioengine=nbd', `--uri=${srv.uri}`, '--rw=read', '--bs=1M', '--iodepth=1', '--size=16M', '--output-format=terse']);
    assert.equal(r.code, 0, r.stderr);
    const deadline = Date.now() + 20_000;
    let s = await stats(cache);
    while (s.counters.fillBytes < 4 * MiB && Date.now() < deadline) {
      await new Promise((res) => setTimeout(res, 100));
      s = await stats(cache);
    }
    assert.equal(s.counters.readMissBytes, 16 * MiB);
    assert.equal(s.counters.fillBytes, 4 * MiB);
    assert.equal(s.counters.sequentialSkippedBytes, 12 * MiB);
  } finally {
    if (srv.proc.exitCode === null) assert.equal(await srv.stop(), 0);
  }
});
