import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createLogger, parseLogLevel } from '../src/log.js';

function capture(level: 'debug' | 'info' | 'warn' | 'error', format: 'text' | 'json' = 'text') {
  const lines: string[] = [];
  let t = Date.parse('2026-12-01T00:00:00.000Z');
  const log = createLogger({ level, format, write: (l) => lines.push(l), now: () => new Date(t) });
  return { log, lines, advance: (ms: number) => (t += ms) };
}

test('text lines carry an ISO time, the level, the event and quoted fields', () => {
  const { log, lines } = capture('info');
  log.debug('connect', 'hidden');
  log.info('start', 'serving', { cache: 'a b.img', segs: 63, extra: undefined });
  assert.deepEqual(lines, ['2026-12-01T00:00:00.000Z INFO  start: serving cache="a b.img" segs=63\n']);
});

test('json lines parse and keep every defined field', () => {
  const { log, lines } = capture('debug', 'json');
  log.debug('connect', 'client', { peer: '127.0.0.1:5', tls: false });
  assert.deepEqual(JSON.parse(lines[0]!), { time: '2026-12-01T00:00:00.000Z', level: 'debug', event: 'connect', msg: 'client', peer: '127.0.0.1:5', tls: false });
});

test('limited lines go out once per interval and count what they suppressed', () => {
  const { log, lines, advance } = capture('info');
  for (let i = 0; i < 5; i++) log.limited('error', 'wb', 1000, 'writeback', 'failed');
  advance(1000);
  log.limited('error', 'wb', 1000, 'writeback', 'failed');
  assert.equal(lines.length, 2);
  assert.match(lines[1]!, /suppressed=4$/m);
  assert.equal(parseLogLevel('warn'), 'warn');
  assert.equal(parseLogLevel('loud'), null);
});
