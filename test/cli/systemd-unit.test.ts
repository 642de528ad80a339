/**
 * contrib/pcache@.service passes `systemd-analyze verify` (where systemd is installed). verify
 * checks that ExecStart's program exists, so the copy verified here points ExecStart at this
 * checkout's bin/pcache.js instead of the installed /usr/local/bin/pcache; nothing else changes.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { REPO_ROOT } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const UNIT = join(REPO_ROOT, 'contrib/pcache@.service');
const INSTALLED = '/usr/local/bin/pcache';

test('contrib/pcache@.service passes systemd-analyze verify; a broken copy does not', async (t) => {
  if (!(await haveTool('systemd-analyze'))) return t.skip('systemd-analyze is not installed (Debian package systemd)');
  const unit = await readFile(UNIT, 'utf8');
  assert.match(unit, new RegExp(`^ExecStart=${INSTALLED} serve --config /etc/pcache/%i\\.conf$`, 'm'), 'the instance names the config file');
  assert.match(unit, /^KillSignal=SIGTERM$/m);
  assert.match(unit, /^Restart=on-failure$/m);
  assert.doesNotMatch(unit, /^ExecStart=.*\bnpx\b/m, 'npx would not pass SIGTERM on');

  const dir = await tempDir();
  const good = join(dir, 'pcache@vol0.service');
  await writeFile(good, unit.replace(INSTALLED, join(REPO_ROOT, 'bin/pcache.js')));
  const ok = await run('systemd-analyze', ['verify', good]);
  assert.equal(ok.code, 0, ok.stdout + ok.stderr);
  assert.equal(ok.stderr.trim(), '', 'no warnings');

  // verify really checks: a typo in a directive and a missing program are caught.
  const bad = join(dir, 'pcache@bad.service');
  await writeFile(bad, unit.replace(INSTALLED, join(dir, 'no-such-pcache')).replace('KillSignal=SIGTERM', 'KillSignal=SIGTREM'));
  const r = await run('systemd-analyze', ['verify', bad]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /no-such-pcache/);
  assert.match(r.stderr, /SIGTREM/);
});
