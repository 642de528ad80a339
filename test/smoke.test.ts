import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32c } from '@node-rs/crc32';
test('crc', () => { assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283); });
