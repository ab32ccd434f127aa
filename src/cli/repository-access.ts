import { resolve } from 'node:path';
import type { Command } from 'commander';
import type { Catalog } from '../catalog/index.ts';
import { SnapshiftError } from '../core/errors.ts';
import { openRepository, repositoryEncryption, type Repository } from '../repository/index.ts';
import { resolvePassword } from './password.ts';

export interface RepositoryCliOptions {
  repo?: string;
  passwordFile?: string;
}

/** Adds --repo and --password-file to a command that reads or writes a repository. */
export function repositoryOption(command: Command): Command {
  return command
    .option('--repo <path>', 'repository path (default $SNAPSHIFT_REPOSITORY, or the one the catalog knows for the VM)')
    .option('--password-file <path>', 'file holding the repository password (else $SNAPSHIFT_PASSWORD, else a prompt)');
}

/**
 * Opens the repository a command names: --repo, else $SNAPSHIFT_REPOSITORY, else where the catalog last
 * saw this VM's restore points.
 */
export async function openRepositoryForCli(options: RepositoryCliOptions, catalog: Catalog, vmName?: string): Promise<Repository> {
  return openRepositoryAt(repositoryPathFor(options, catalog, vmName), options.passwordFile);
}

function repositoryPathFor(options: RepositoryCliOptions, catalog: Catalog, vmName?: string): string {
  const path = options.repo ?? process.env.SNAPSHIFT_REPOSITORY ?? (vmName ? catalog.lastRepositoryOf(vmName) : undefined);
  if (!path) throw new SnapshiftError('USAGE', 'no repository given: pass --repo PATH or set SNAPSHIFT_REPOSITORY');
  return resolve(path);
}

/**
 * Opens the repository as openRepositoryForCli does, and keeps its path and password for a process this
 * command starts to read it too (the NBD server behind an instant recovery).
 */
export async function openRepositoryForChild(options: RepositoryCliOptions, catalog: Catalog, vmName?: string): Promise<{ repository: Repository; path: string; password: string | undefined }> {
  const path = repositoryPathFor(options, catalog, vmName);
  const password = (await repositoryEncryption(path)) === 'encrypted' ? await resolvePassword({ passwordFile: options.passwordFile }) : undefined;
  return { repository: await openRepository(path, { password }), path, password };
}

/** Opens the repository at `path`, asking for a password only if it is encrypted. */
export async function openRepositoryAt(path: string, passwordFile?: string): Promise<Repository> {
  const absolute = resolve(path);
  const password = (await repositoryEncryption(absolute)) === 'encrypted' ? await resolvePassword({ passwordFile }) : undefined;
  return openRepository(absolute, { password });
}
