import type { Command } from 'commander';
import { syncCatalogWithRepository } from '../catalog/index.ts';
import { openCatalog, printJson } from './context.ts';
import { withExamples } from './help-examples.ts';
import { openRepositoryForCli, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';

/** `snapshift catalog sync`: the catalog's view of a repository, rebuilt from the repository itself. */
export function registerCatalogCommands(program: Command): void {
  const catalogCommand = withExamples(
    program.command('catalog').description('the catalog (restore points, jobs, sessions) in the home folder'),
    'snapshift catalog sync --repo /srv/backups',
  );

  withExamples(
    repositoryOption(
      catalogCommand
        .command('sync')
        .description('record the restore points of a repository the catalog lacks, and drop those whose manifest is gone')
        .option('--json', 'print the result as JSON'),
    ),
    'snapshift catalog sync --repo /srv/backups',
    'SNAPSHIFT_HOME=/var/lib/snapshift-new snapshift catalog sync --repo /srv/backups --password-file /root/.repo-pass   # a catalog lost with its host',
  )
    .action(async (options: RepositoryCliOptions & { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      await using repository = await openRepositoryForCli(options, catalog);
      const report = await syncCatalogWithRepository(catalog, repository);
      // A manifest that cannot be read is the repository's problem, not the catalog's: say so, exit 1.
      if (report.damaged.length > 0) process.exitCode = 1;
      if (options.json) return printJson(report);
      for (const id of report.damaged) console.error(`snapshift: warning: the manifest of restore point ${id} cannot be read (run "snapshift check --repo ${report.repository}")`);
      for (const id of report.elsewhere) console.error(`snapshift: warning: restore point ${id} is recorded in another repository; left as it is`);
      console.log(`catalog sync of ${report.repository}: ${report.added.length} added, ${report.removed.length} removed, ${report.unchanged} unchanged`);
    });
}

/** Forgotten restore points leave the catalog too (as with a job's retention), so it never lists what is gone. */
export function forgetInCatalog(command: Command, restorePointIds: readonly string[]): void {
  if (restorePointIds.length === 0) return;
  using catalog = openCatalog(command);
  catalog.removeRestorePoints(restorePointIds);
}
