import type { Command } from './command.js';

/**
 * Every `pcache <name>` command. Adding one is one line here plus its module, which exports
 * `command`; modules load only when their command runs, so one command's dependencies never
 * slow down another.
 */
export const COMMANDS: Record<string, () => Promise<{ command: Command }>> = {
  format: () => import('./format.js'),
  check: () => import('./check.js'),
  dump: () => import('./dump.js'),
  writeback: () => import('./writeback.js'),
  serve: () => import('./serve.js'),
  status: () => import('./remote.js').then((m) => ({ command: m.status })),
  table: () => import('./remote.js').then((m) => ({ command: m.table })),
  message: () => import('./remote.js').then((m) => ({ command: m.message })),
  stats: () => import('./remote.js').then((m) => ({ command: m.stats })),
  flush: () => import('./remote.js').then((m) => ({ command: m.flush })),
  stop: () => import('./remote.js').then((m) => ({ command: m.stop })),
};
