import { createPrivateKey, type KeyObject } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { MANIFEST_FORMATS, importManifest, type ManifestFormat } from '../../registry/manifests/import.js';
import { signFile } from '../../registry/manifests/signed-list.js';
import { loadSigners, type ManifestSigner } from '../../registry/manifests/signers.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, info, list, out, readPassphrase, required, str, type Command } from '../io.js';

async function readInput(file: string): Promise<Buffer> {
  try { return await readFile(file); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`); }
}

export const manifestImportCommand: Command = {
  name: 'manifest import',
  summary: 'import a chipmaker\'s signed device list into a batch (all or nothing)',
  usage: `Usage: hallmark manifest import FILE --batch ID --trust SIGNER.pem [--trust …] [--format microchip|csv|ndjson]
                                [--signature FILE.sig] [--skip-invalid] [--ignore-birth-certs] [--json] [--home DIR]

FILE is a Microchip Trust&GO / TrustFLEX / TNGLORA manifest (a JSON array of ES256 JWS entries) or a
generic CSV / NDJSON device list with a detached signature (default FILE.sig). The format is detected
from the content unless --format is given. --trust names a manifest signer: a PEM certificate (Microchip
signers are matched by x5t#S256 / kid) or, for lists, a PEM public key; repeat it for several signers.

Every signature and entry is verified before anything is stored; the first invalid entry refuses the
whole import, naming its entry or line, unless --skip-invalid is given (each invalid entry is then
reported and the others imported). Birth certificates (Microchip x5c, the birth_cert column) must chain
to a vendor CA added with "hallmark vendor add"; --ignore-birth-certs registers the keys without them.
Importing the same file again changes nothing. See docs/manifests.md.`,
  allowPositionals: true,
  options: {
    batch: { type: 'string' }, trust: { type: 'string', multiple: true }, format: { type: 'string' }, signature: { type: 'string' },
    'skip-invalid': { type: 'boolean' }, 'ignore-birth-certs': { type: 'boolean' }, json: { type: 'boolean' },
  },
  async run(args) {
    const file = args.positionals[0];
    if (!file || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one manifest FILE\n${this.usage}`);
    const batch = required(args, 'batch', this.usage);
    const format = str(args, 'format');
    if (format !== undefined && !(MANIFEST_FORMATS as readonly string[]).includes(format)) throw new HallmarkError('BAD_REQUEST', `--format is one of ${MANIFEST_FORMATS.join(', ')}`);
    const trustFiles = list(args, 'trust');
    if (trustFiles.length === 0) throw new HallmarkError('BAD_REQUEST', `name the manifest signer with --trust SIGNER.pem\n${this.usage}`);
    const signers: ManifestSigner[] = [];
    for (const f of trustFiles) signers.push(...loadSigners(await readInput(f), f));
    const json = flag(args, 'json');
    return withStoreOnly(args, async (ctx) => {
      const report = await importManifest(ctx.store, {
        file, batch, signers, format: format as ManifestFormat | undefined, signatureFile: str(args, 'signature'),
        skipInvalid: flag(args, 'skip-invalid'), ignoreBirthCertificates: flag(args, 'ignore-birth-certs'), actor: actor(),
        onInvalid: json ? undefined : (e) => info(`skipped invalid ${e.where}: ${e.reason}`),
      });
      if (json) { out(JSON.stringify(report, null, 2)); return 0; }
      for (const w of report.warnings) info(`warning: ${w}`);
      out(`Imported ${file} (${report.format}, sha256 ${report.fileSha256}) into batch ${report.batch}: ${report.entries} entries, `
        + `${report.registered} registered, ${report.unchanged} unchanged, ${report.reRegistered} re-registered, ${report.invalidSkipped} invalid skipped`);
      for (const s of report.signers) out(`signed by ${s.name} (sha256 ${s.sha256})`);
      return 0;
    });
  },
};

async function signingKey(args: Parameters<Command['run']>[0], file: string): Promise<KeyObject> {
  const pem = (await readInput(file)).toString('utf8');
  if (!pem.includes('-----BEGIN')) throw new HallmarkError('BAD_PEM', `${file} is not a PEM private key`);
  try {
    if (pem.includes('ENCRYPTED PRIVATE KEY')) {
      const passphrase = await readPassphrase(args, { envVar: 'HALLMARK_MANIFEST_KEY_PASSPHRASE', prompt: 'Manifest signing key passphrase: ' });
      return createPrivateKey({ key: pem, format: 'pem', passphrase });
    }
    return createPrivateKey({ key: pem, format: 'pem' });
  } catch (err) {
    if (err instanceof HallmarkError) throw err;
    throw new HallmarkError('BAD_PEM', `${file}: cannot read the private key (${(err as Error).message})`);
  }
}

export const manifestSignCommand: Command = {
  name: 'manifest sign',
  summary: 'sign a CSV / NDJSON device list for manifest import (producers)',
  usage: `Usage: hallmark manifest sign FILE --key KEY.pem [--out FILE.sig] [--passphrase-file F]

Writes a detached signature over the exact bytes of FILE: ECDSA P-256 with SHA-256 (DER, as
"openssl dgst -sha256 -sign" writes it) for a P-256 key, or Ed25519 (64 bytes) for an Ed25519 key.
KEY.pem is a PKCS#8 or SEC1 PEM private key; an encrypted PKCS#8 key is opened with
HALLMARK_MANIFEST_KEY_PASSPHRASE, HALLMARK_PASSPHRASE or --passphrase-file. The importer verifies it
with the matching certificate or public key given to "manifest import --trust". See docs/manifests.md.`,
  allowPositionals: true,
  options: { key: { type: 'string' }, out: { type: 'string' }, 'passphrase-file': { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const file = args.positionals[0];
    if (!file || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one FILE to sign\n${this.usage}`);
    const key = await signingKey(args, required(args, 'key', this.usage));
    const target = str(args, 'out') ?? `${file}.sig`;
    const signed = await signFile(file, key).catch((err: unknown) => {
      if (err instanceof HallmarkError) throw err;
      throw new HallmarkError('BAD_REQUEST', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    });
    await writeFile(target, signed.signature);
    if (flag(args, 'json')) out(JSON.stringify({ file, signature: target, algorithm: signed.algorithm, fileSha256: signed.sha256 }, null, 2));
    else out(`Signed ${file} (sha256 ${signed.sha256}) with ${signed.algorithm}: ${target}`);
    return 0;
  },
};
