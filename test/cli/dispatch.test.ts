import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseArgs, parseIntOption, parseSizeOption } from '../../src/cli/args.js';
import { COMMANDS } from '../../src/cli/commands.js';
import { CliError, UsageError } from '../../src/cli/errors.js';
import { runPcacheInProcess } from '../helpers/cli.js';

test('usage lists every command of the table; help works three ways', async () => {
  const none = await runPcacheInProcess([]);
  assert.equal(none.code, 2);
  for (const name of Object.keys(COMMANDS)) assert.match(none.stderr, new RegExp(`^  ${name} +\\S`, 'm'));
  for (const args of [['--help'], ['help'], ['-h']]) {
    const r = await runPcacheInProcess(args);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^usage: pcache <command>/);
  }
  const topic = await runPcacheInProcess(['help', 'check']);
  assert.equal(topic.code, 0);
  assert.match(topic.stdout, /^usage: pcache check <cache-dev> \[--json\] \[--backing-size N\]/);
  assert.equal((await runPcacheInProcess(['help', 'nope'])).code, 2);
});

test('a command added to the table is dispatched; failures map to exit statuses', async (t) => {
  const outcomes: Record<string, () => Promise<number>> = {
    ok: async () => 0,
    user: async () => {
      throw new CliError('the device is on fire', 3);
    },
    system: async () => {
      throw Object.assign(new Error("EACCES: permission denied, open '/dev/x'"), { code: 'EACCES' });
    },
    bug: async () => {
      throw new TypeError("Cannot read properties of undefined (reading 'seg')");
    },
  };
  for (const [name, run] of Object.entries(outcomes)) {
    COMMANDS[`test-${name}`] = async () => ({ command: { summary: name, help: `usage: ${name}\n`, run } });
  }
  t.after(() => {
    for (const name of Object.keys(outcomes)) delete COMMANDS[`test-${name}`];
  });
  assert.deepEqual(await runPcacheInProcess(['test-ok']), { code: 0, stdout: '', stderr: '' });
  assert.deepEqual(await runPcacheInProcess(['test-user']), { code: 3, stdout: '', stderr: 'pcache: the device is on fire\n' });
  const sys = await runPcacheInProcess(['test-system']);
  assert.equal(sys.code, 1);
  assert.equal(sys.stderr, "pcache: EACCES: permission denied, open '/dev/x'\n");
  const bug = await runPcacheInProcess(['test-bug']);
  assert.equal(bug.code, 70);
  assert.equal(bug.stderr, "pcache: internal error: Cannot read properties of undefined (reading 'seg')\n");
});

test('option parsing is strict: unknown, repeated, missing values and extra arguments are errors', () => {
  const spec = { json: { type: 'boolean' }, size: { type: 'string', value: 'N' } } as const;
  const names = { min: 1, max: 1, names: 'the cache device' };
  assert.deepEqual(parseArgs(['dev', '--json', '--size', '5'], spec, names), {
    options: { json: true, size: '5' },
    positionals: ['dev'],
    help: false,
  });
  assert.deepEqual(parseArgs(['--size=7', '--', '--dev'], spec, names).positionals, ['--dev']);
  assert.equal(parseArgs(['--help'], spec, names).help, true, 'help needs no positionals');
  for (const [argv, msg] of [
    [['dev', '--nope'], /unknown option --nope/],
    [['dev', '-x'], /unknown option -x/],
    [['dev', '--json', '--json'], /more than once/],
    [['dev', '--size'], /needs a value \(N\)/],
    [['dev', '--json=1'], /takes no value/],
    [[], /missing the cache device/],
    [['a', 'b'], /unexpected argument b/],
  ] as const) {
    assert.throws(() => parseArgs(argv, spec, names), (e: unknown) => e instanceof UsageError && msg.test(e.message));
  }
});

test('numbers and sizes', () => {
  assert.equal(parseIntOption('gc-percent', '90', 0, 90), 90);
  assert.equal(parseIntOption('gc-percent', '0', 0, 90), 0);
  for (const bad of ['91', '-1', '5.5', '', 'x', '1e2']) assert.throws(() => parseIntOption('gc-percent', bad, 0, 90), UsageError);
  assert.equal(parseSizeOption('backing-size', '268435456'), 268435456);
  assert.equal(parseSizeOption('backing-size', '256M'), 268435456);
  assert.equal(parseSizeOption('backing-size', '256MiB'), 268435456);
  assert.equal(parseSizeOption('backing-size', '1g'), 2 ** 30);
  assert.equal(parseSizeOption('backing-size', '4K'), 4096);
  for (const bad of ['', 'M', '1.5G', '-1', '1Q', '99999999999T']) assert.throws(() => parseSizeOption('backing-size', bad), UsageError);
});
