// Prints docs/ERRORS.md from the typed list in src/core/errors.ts:
//   node --import tsx scripts/error-codes.ts > docs/ERRORS.md
import { errorCodesMarkdown } from '../src/core/error-codes-doc.ts';

process.stdout.write(errorCodesMarkdown());
