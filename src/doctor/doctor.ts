import { requiredBy, type Check, type CheckResult, type DoctorReport, type Feature } from './check.ts';
import { checks as allChecks } from './checks.ts';
import { labelOf, probeEnvironmentOfProcess, runProbe, type ProbeEnvironment } from './probes.ts';

export interface DoctorOptions {
  /** The features that must work; a check is required when one of them (or what they include) needs it. */
  for: readonly Feature[];
  environment?: ProbeEnvironment;
  checks?: readonly Check[];
}

/** Runs every check, one at a time (they are quick; three start a short-lived qemu-storage-daemon). */
export async function runDoctor(options: DoctorOptions): Promise<DoctorReport> {
  const environment = options.environment ?? probeEnvironmentOfProcess();
  const required = requiredBy(options.for);
  const results: CheckResult[] = [];
  for (const check of options.checks ?? allChecks) {
    const outcome = await runProbe(check.probe, environment);
    results.push({
      id: check.id,
      label: labelOf(check.probe),
      found: outcome.found,
      required: check.fallback === undefined && check.neededBy.some((feature) => required.has(feature)),
      neededBy: [...check.neededBy],
      debianPackage: check.debianPackage ?? null,
      remedy: check.remedy ?? null,
      withoutIt: check.withoutIt,
      fallback: check.fallback ?? null,
      detail: outcome.detail,
    });
  }
  return {
    for: [...options.for],
    requiredFeatures: [...required],
    ok: results.every((result) => result.found || !result.required),
    checks: results,
  };
}

/** One line per check, then what to do: the human form of the report. */
export function formatDoctorReport(report: DoctorReport): string {
  const rows = report.checks.map((result) => [
    result.found ? 'ok' : 'MISSING',
    result.label,
    result.debianPackage ?? '-',
    `${result.required ? 'required' : 'optional'} (${result.neededBy.join(', ')})`,
    result.found ? result.detail : `${result.detail}; without it: ${result.fallback ? `${result.withoutIt} (fallback: ${result.fallback})` : result.withoutIt}`,
  ]);
  const widths = [0, 1, 2, 3].map((column) => Math.max(...rows.map((row) => row[column]!.length)));
  const lines = rows.map((row) => row.map((cell, column) => (column < 4 ? cell.padEnd(widths[column]!) : cell)).join('  '));
  lines.push('', summaryOf(report));
  return lines.join('\n');
}

function summaryOf(report: DoctorReport): string {
  const missing = report.checks.filter((result) => !result.found);
  const requiredMissing = missing.filter((result) => result.required);
  const optionalNote = missing.length > requiredMissing.length ? ` (${missing.length - requiredMissing.length} optional missing)` : '';
  const scope = `for ${report.for.join(', ')}`;
  if (requiredMissing.length === 0) return `doctor: all ${report.checks.filter((result) => result.required).length} required checks pass ${scope}${optionalNote}`;
  const packages = [...new Set(requiredMissing.flatMap((result) => (result.debianPackage ? [result.debianPackage] : [])))];
  const remedies = requiredMissing.filter((result) => !result.debianPackage).map((result) => `${result.label}: ${result.remedy ?? 'see above'}`);
  const fixes = [
    ...(packages.length > 0 ? [`apt-get install ${packages.join(' ')} (or bash scripts/setup.sh)`] : []),
    ...remedies,
  ];
  return `doctor: ${requiredMissing.length} required check(s) missing ${scope}${optionalNote}; fix: ${fixes.join('; ')}`;
}
