import { mkdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

/**
 * Where state lives (DESIGN.md § Conventions): --home, else $SNAPSHIFT_HOME, else /var/lib/snapshift for root
 * and ~/.local/share/snapshift for anyone else. Created on first use.
 */
export function resolveHome(explicit?: string): string {
  const home = explicit ?? process.env.SNAPSHIFT_HOME ?? (process.getuid?.() === 0 ? '/var/lib/snapshift' : join(homedir(), '.local/share/snapshift'));
  const absolute = resolve(home);
  mkdirSync(absolute, { recursive: true, mode: 0o700 });
  return absolute;
}
