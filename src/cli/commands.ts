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
};
