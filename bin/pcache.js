#!/usr/bin/env node
// The installed package runs the compiled JavaScript in dist/ with plain node: no TypeScript
// loader at run time. A source checkout (src/ is never in the package) runs the TypeScript
// through tsx instead, so development needs no build step and never runs a stale dist/.
import { existsSync } from 'node:fs';

const source = new URL('../src/cli/main.ts', import.meta.url);
if (existsSync(source)) {
  const { register } = await import('tsx/esm/api');
  register();
  await import(source.href);
} else {
  await import('../dist/cli/main.js');
}
