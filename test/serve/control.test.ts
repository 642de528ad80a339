import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

test('bad serve invocations get dm-pcache messages before any device is touched', async () => {
  const cases: Array<[string[], string]> = [
    [['c', 'b', 'x'], 'Invalid number of cache option arguments'],
    [['c', 'b', '3', 'cache_mode', 'writeback'], 'Invalid number of cache option arguments'],
    [['c', 'b', '5', 'a', 'b', 'c', 'd', 'e'], 'Invalid number of cache option arguments'],
    [['c', 'b', '2', 'cache_mode', 'writethrough'], 'Invalid cache mode parameter'],
    [['c', 'b', '2', 'data_crc', 'yes'], 'Invalid data crc parameter'],
    [['c', 'b', '1', 'cache_mode'], 'Missing value for cache_mode'],
    [['c', 'b', '1', 'data_crc'], 'Missing value for data_crc'],
    [['c', 'b', '2', 'colour', 'blue'], 'Unrecognised cache option requested'],
  ];
  for (const [args, msg] of cases) {
    // The devices do not exist: a message about them would mean they were touched first.
    const r = await runPcache(['serve', ...args]);
    assert.notEqual(r.code, 0, args.join(' '));
    assert.match(r.stderr, new RegExp(msg), `${args.join(' ')}: ${r.stderr}`);
  }
});

test('status, table, message, stats, a second server, and gc_percent across a restart', async () => {
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  let srv = await startServe(dir, cache, backing, ['4', 'cache_mode', 'writeback', 'data_crc', 'true']);
  try {
    assert.match(srv.statusLine, /^0 131072 pcache 0 31 31 1 70 1183 0:0 0:0 0:0$/);
    const st = await runPcache(['status', cache]);
    assert.equal(st.code, 0, st.stderr);
    assert.match(st.stdout, /^0 131072 pcache 0 31 31 \d+ 70 1183 \d+:\d+ \d+:\d+ \d+:\d+\n$/);
    const tb = await runPcache(['table', cache]);
    assert.equal(tb.stdout, `0 131072 pcache ${cache} ${backing} 4 cache_mode writeback crc true\n`);

    for (const bad of [['gc_percent', '91'], ['gc_percent', '-1'], ['gc_percent', ''], ['gc_percent', 'bad'], ['invalid_cmd', '1'], ['gc_percent', '256'], ['gc_percent'], ['gc_percent', '10', 'x']]) {
      const r = await runPcache(['message', cache, ...bad]);
      assert.notEqual(r.code, 0, bad.join(' '));
      assert.match(r.stderr, /Invalid argument/);
    }
    assert.equal((await runPcache(['status', cache])).stdout.split(' ')[7], '70');
    const ok = await runPcache(['message', cache, 'GC_Percent', '10']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal((await runPcache(['status', cache])).stdout.split(' ')[7], '10');

    const stats = await runPcache(['stats', cache, '--json']);
    assert.equal(stats.code, 0, stats.stderr);
    const parsed = JSON.parse(stats.stdout) as { counters: { writes: number }; gcPercent: number };
    assert.equal(parsed.gcPercent, 10);
    assert.equal(typeof parsed.counters.writes, 'number');

    // A second server on the same cache device fails at once; the first keeps serving.
    const second = await runPcache(['serve', cache, backing, '2', 'data_crc', 'true', '--socket', join(dir, 'second.sock')], { timeoutMs: 20_000 });
    assert.notEqual(second.code, 0);
    assert.match(second.stderr, /in use/);
    assert.match(second.stderr, new RegExp(cache.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
    assert.equal((await runPcache(['status', cache])).code, 0);

    assert.equal(await srv.stop(), 0);
    srv = await startServe(dir, cache, backing, ['2', 'data_crc', 'true']);
    assert.equal((await runPcache(['status', cache])).stdout.split(' ')[7], '10');
    // The other data_crc is refused with dm-pcache's message.
    assert.equal(await srv.stop(), 0);
    const wrong = await runPcache(['serve', cache, backing, '2', 'data_crc', 'false', '--socket', join(dir, 'x.sock')]);
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stderr, /invalid option for data_crc: false, expected: true/);
  } finally {
    if (srv.proc.exitCode === null) await srv.kill();
  }
});

test('nbdinfo sees the size and the flags; SIGTERM stops cleanly', async (t) => {
  if (!(await haveTool('nbdinfo'))) return t.skip('nbdinfo is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const srv = await startServe(dir, cache, backing);
  try {
    const r = await run('nbdinfo', ['--json', srv.uri]);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as { exports: Array<Record<string, unknown>> };
    const e = info.exports[0]!;
    assert.equal(e['export-size'], 64 * MiB);
    for (const f of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_multi_conn']) assert.equal(e[f], true, f);
    assert.equal(e['block_size_minimum'], 512);
    assert.equal(e['block_size_preferred'], 4096);
    const list = await run('nbdinfo', ['--list', srv.uri]);
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /export="?"?/);
    srv.proc.kill('SIGTERM');
    const { code } = await srv.exited;
    assert.equal(code, 0);
    // The lock was released: the device opens again.
    const again = await startServe(dir, cache, backing);
    assert.equal(await again.stop(), 0);
  } finally {
    if (srv.proc.exitCode === null) await srv.kill();
  }
});
