import type { Command } from 'commander';
import { Catalog, resolveHome } from '../catalog/index.ts';

export interface GlobalOptions {
  home?: string;
  debug?: boolean;
}

/** The catalog of the home the user chose (--home, $SNAPSHIFT_HOME, or the default). */
export function openCatalog(command: Command): Catalog {
  return Catalog.open(resolveHome(command.optsWithGlobals<GlobalOptions>().home));
}

export function homeOf(command: Command): string {
  return resolveHome(command.optsWithGlobals<GlobalOptions>().home);
}

/** Writes one JSON document on stdout: the whole output of a `--json` command. */
export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, (_key, v: unknown) => (v === Infinity ? null : v), 2)}\n`);
}
