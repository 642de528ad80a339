/**
 * The packaged release: `npm pack` (its prepack builds dist/), `npm install --omit=dev` of the
 * tarball into an empty directory, and the installed `pcache` running compiled JavaScript with
 * plain node: --version, format, check.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { REPO_ROOT } from '../helpers/cli.js';
import { sparseFile } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const NPM_FLAGS = ['--no-audit', '--no-fund', '--prefer-offline', '--loglevel=error'];

test('npm pack, npm install --omit=dev of the tarball elsewhere: pcache --version, format and check work with no TypeScript loader', async () => {
  const version = (JSON.parse(await readFile(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  const packDir = await tempDir('pcache-pack-');
  const packed = await runIn(REPO_ROOT, 'npm', ['pack', '--pack-destination', packDir, ...NPM_FLAGS]);
  assert.equal(packed.code, 0, packed.stderr);
  const tarballs = (await readdir(packDir)).filter((f) => f.endsWith('.tgz'));
  assert.deepEqual(tarballs, [`pcache-${version}.tgz`]);
  const tarball = join(packDir, tarballs[0]!);

  const list = await run('tar', ['-tzf', tarball]);
  assert.equal(list.code, 0, list.stderr);
  const files = list.stdout.split('\n').filter(Boolean);
  assert.ok(files.includes('package/dist/cli/main.js'), 'the compiled CLI is in the package');
  assert.ok(files.includes('package/bin/pcache.js'));
  assert.ok(files.includes('package/contrib/pcache@.service'));
  assert.ok(!files.some((f) => f.startsWith('package/src/') || f.startsWith('package/test/')), 'no TypeScript sources or tests');

  const appDir = await tempDir('pcache-install-');
  await writeFile(join(appDir, 'package.json'), JSON.stringify({ name: 'pcache-install-test', private: true }));
  const install = await runIn(appDir, 'npm', ['install', '--omit=dev', ...NPM_FLAGS, tarball]);
  assert.equal(install.code, 0, install.stderr);
  assert.ok(!existsSync(join(appDir, 'node_modules/tsx')), 'tsx is a development dependency only');
  assert.ok(!existsSync(join(appDir, 'node_modules/typescript')));

  const pcache = join(appDir, 'node_modules/.bin/pcache');
  const env = { ...process.env, PCACHE_RUN_DIR: join(appDir, 'run') };
  const v = await runIn(appDir, pcache, ['--version'], env);
  assert.equal(v.code, 0, v.stderr);
  assert.equal(v.stdout, `pcache ${version}\n`);

  const dev = await sparseFile(join(appDir, 'cache.img'), 512 * MiB);
  const f = await runIn(appDir, pcache, ['format', dev, '--data-crc'], env);
  assert.equal(f.code, 0, f.stderr);
  const c = await runIn(appDir, pcache, ['check', dev], env);
  assert.equal(c.code, 0, c.stdout + c.stderr);
  assert.match(c.stdout, /^problems\s+none$/m);
  assert.match(c.stdout, /^data_crc\s+on/m);
});

/** run() in a working directory, through sh so the program's own shebang decides how it runs. */
function runIn(cwd: string, cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): ReturnType<typeof run> {
  const quoted = [cmd, ...args].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  return run('sh', ['-c', `cd '${cwd.replace(/'/g, `'\\''`)}' && exec ${quoted}`], { timeoutMs: 240_000, env });
}
