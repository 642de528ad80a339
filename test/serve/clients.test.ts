import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, havePythonNbd, run, runPython } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

test('qemu-io patterns read back, including the last 512 bytes; a request past the end fails and the connection lives', async (t) => {
  if (!(await haveTool('qemu-io'))) return t.skip('qemu-io is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const srv = await startServe(dir, cache, backing);
  try {
    const last = 64 * MiB - 512;
    const cmds = ['write -P 0xab 0 64k', 'write -P 0xcd 1M 1M', `write -P 0xef ${last} 512`, 'write -P 0x11 4k 4k', 'flush', 'read -P 0xab 0 4k', 'read -P 0x11 4k 4k', 'read -P 0xab 8k 56k', 'read -P 0xcd 1M 1M', `read -P 0xef ${last} 512`, 'read -P 0 2M 1M'];
    const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), srv.uri]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error/i);
    if (await havePythonNbd()) {
      const py = `
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
try:
    h.pread(1024, size - 512)
    print("NO ERROR")
except nbd.Error as e:
    print("ERR", e.errno)
buf = h.pread(512, size - 512)
assert buf == b"\\xef" * 512, "after the error the same connection still reads"
print("OK")
`;
      const p = await runPython(py, [srv.uri]);
      assert.equal(p.code, 0, p.stderr);
      assert.match(p.stdout, /^ERR /m);
      assert.match(p.stdout, /^OK$/m);
    }
  } finally {
    await srv.stop();
  }
  // After a restart the data is still there (clean shutdown wrote the open kset).
  const again = await startServe(dir, cache, backing);
  try {
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xcd 1M 1M', '-c', `read -P 0xef ${64 * MiB - 512} 512`, again.uri]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  } finally {
    await again.stop();
  }
});

test('nbdcopy of a 256 MiB random file in and out matches', async (t) => {
  if (!(await haveTool('nbdcopy'))) return t.skip('nbdcopy is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 1024 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 256 * MiB);
  const src = randomBytes(256 * MiB);
  await writeFile(join(dir, 'src.bin'), src);
  const srv = await startServe(dir, cache, backing);
  try {
    const cin = await run('nbdcopy', [join(dir, 'src.bin'), srv.uri], { timeoutMs: 120_000 });
    assert.equal(cin.code, 0, cin.stderr);
    const cout = await run('nbdcopy', [srv.uri, join(dir, 'out.bin')], { timeoutMs: 120_000 });
    assert.equal(cout.code, 0, cout.stderr);
    assert.equal(sha(await readFile(join(dir, 'out.bin'))), sha(src));
    // pcache flush writes everything back: the backing file alone holds the copy.
    const fl = await runPcache(['flush', cache], { timeoutMs: 120_000 });
    assert.equal(fl.code, 0, fl.stderr);
    const [, , , , , , , , , keyHead, dirtyTail] = fl.stdout.trim().split(' ');
    assert.equal(dirtyTail, keyHead);
    assert.equal(sha(await readFile(backing)), sha(src));
  } finally {
    await srv.stop();
  }
});

test('fio --ioengine=nbd with crc32c verify, 4 jobs, mixed 4k and 64k random writes', async (t) => {
  if (!(await haveTool('fio'))) return t.skip('fio is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 256 * MiB);
  const srv = await startServe(dir, cache, backing);
  try {
    const jobs: string[] = [];
    for (let j = 0; j < 4; j++) {
      // Each job owns a quarter of the device so that verification sees only its own writes.
      jobs.push(`--name=j${j}`, `--offset=${j * 64}m`, '--size=64m', `--bssplit=4k/50:64k/50`);
    }
    const r = await run(
      'fio',
      ['--ioengine=nbd', `--uri=${srv.uri}`, '--verify_state_save=0', '--rw=randwrite', '--iodepth=16', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--io_size=32m', ...jobs],
      { timeoutMs: 300_000 },
    );
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /verify: bad|crc32c: verify failed|bad magic/i);
    assert.match(r.stdout, /Run status group/);
  } finally {
    await srv.stop();
  }
});
