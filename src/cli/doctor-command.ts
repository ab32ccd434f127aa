import type { Command } from 'commander';
import { SnapshiftError, ExitStatus } from '../core/errors.ts';
import { features, formatDoctorReport, isFeature, runDoctor, type Feature } from '../doctor/index.ts';
import { printJson } from './context.ts';

/** `snapshift doctor`: is this host fit for the engine, a storage provider, the lab, the tests? */
export function registerDoctorCommand(program: Command): void {
  program
    .command('doctor')
    .description('check every program, QEMU block driver, kernel feature and device snapshift needs; exit 2 if a required one is missing')
    .option('--for <features>', `comma-separated features that must work (${Object.keys(features).join(', ')})`, 'engine')
    .option('--json', 'print every check as JSON')
    .addHelpText(
      'after',
      `\nFeatures:\n${Object.entries(features).map(([name, feature]) => `  ${name.padEnd(9)} ${feature.description}`).join('\n')}` +
        '\n\nExamples:\n  snapshift doctor\n  snapshift doctor --for ceph-rbd\n  snapshift doctor --for tests --json',
    )
    .action(async (options: { for: string; json?: boolean }) => {
      const wanted = parseFeatures(options.for);
      const report = await runDoctor({ for: wanted });
      if (options.json) printJson(report);
      else console.log(formatDoctorReport(report));
      if (!report.ok) process.exitCode = ExitStatus.failed;
    });
}

function parseFeatures(list: string): Feature[] {
  const names = list.split(',').map((name) => name.trim()).filter((name) => name !== '');
  const unknown = names.filter((name) => !isFeature(name));
  if (names.length === 0 || unknown.length > 0) {
    throw new SnapshiftError('USAGE', `unknown feature "${unknown.join(', ') || list}" for --for: use ${Object.keys(features).join(', ')}`);
  }
  return names.filter(isFeature);
}
