import { ExitStatus, errorCodes } from './errors.ts';

const statusNames = Object.fromEntries(Object.entries(ExitStatus).map(([name, status]) => [status, name])) as Record<number, string>;

/** docs/ERRORS.md: every error code with its exit status and meaning, generated from `errorCodes`. */
export function errorCodesMarkdown(): string {
  const rows = Object.entries(errorCodes).map(([code, info]) => `| \`${code}\` | ${info.exitStatus} (${statusNames[info.exitStatus]}) | ${info.meaning.replace(/\|/g, '\\|')} |`);
  return [
    '# Error codes',
    '',
    'Generated from `src/core/errors.ts` by `node --import tsx scripts/error-codes.ts > docs/ERRORS.md`; a test',
    'fails when this file and the list differ. Every error snapshift raises carries one of these codes',
    '(`SnapshiftError.code`, for programs that use the engine); the CLI prints its message on one line and exits',
    'with its status (README § Exit statuses).',
    '',
    '| code | exit status | meaning |',
    '|---|---|---|',
    ...rows,
    '',
  ].join('\n');
}
