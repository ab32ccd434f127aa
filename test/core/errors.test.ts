import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { ExitStatus, SnapshiftError, errorCodes, exitStatusFor } from '../../src/core/errors.ts';
import { errorCodesMarkdown } from '../../src/core/error-codes-doc.ts';

test('docs/ERRORS.md is the generated list (regenerate: node --import tsx scripts/error-codes.ts > docs/ERRORS.md)', () => {
  assert.equal(readFileSync('docs/ERRORS.md', 'utf8'), errorCodesMarkdown());
});

test('every code written in src is in the typed list, and the list has no code nobody raises', () => {
  const used = new Set<string>();
  const walk = (dir: string): void => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (path.endsWith('.ts') && !path.endsWith('errors.ts')) {
        for (const match of readFileSync(path, 'utf8').matchAll(/(?:SnapshiftError\(\s*|code:\s*|super\(\s*|, |\?\? )'([A-Z][A-Z0-9_]+)'/g)) used.add(match[1]!);
      }
    }
  };
  walk('src');
  const listed = new Set(Object.keys(errorCodes));
  // Some matches are not error codes (NBD reply names, signal names); only codes that look like ours count.
  const unlisted = [...used].filter((code) => !listed.has(code) && /_(FAILED|UNKNOWN|MISSING|DAMAGED|REQUIRED)$|^(REPO|QMP|QGA|NBD|LAB|STORAGE|VM|RESTORE)_/.test(code) && !code.startsWith('NBD_REP_'));
  assert.deepEqual(unlisted, []);
  const unused = [...listed].filter((code) => !used.has(code));
  assert.deepEqual(unused, [], 'codes listed but raised nowhere: remove them from src/core/errors.ts');
});

test('exit statuses come from the list', () => {
  assert.equal(exitStatusFor(new SnapshiftError('USAGE', 'x')), ExitStatus.usage);
  assert.equal(exitStatusFor(new SnapshiftError('BAD_ARGUMENT', 'x')), ExitStatus.usage);
  assert.equal(exitStatusFor(new SnapshiftError('RESTORE_STOPPED', 'x')), ExitStatus.stopped);
  assert.equal(exitStatusFor(new SnapshiftError('REPO_LOCKED', 'x')), ExitStatus.failed);
  assert.equal(exitStatusFor(new Error('plain')), ExitStatus.failed);
  // A code outside the list is a type error (npm run typecheck fails without the directive below).
  // @ts-expect-error -- not a listed code
  assert.equal(exitStatusFor(new SnapshiftError('NO_SUCH_CODE', 'x')), ExitStatus.failed);
});
