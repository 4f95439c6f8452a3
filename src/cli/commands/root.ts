import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HallmarkError } from '../../errors.js';
import { resolveHome } from '../../authority/home.js';
import { OfflineRoot, parseValidity } from '../../authority/offline-root.js';
import { parseRevocationReason } from '../../authority/revocation.js';
import { installRootCrl, installRootRollover } from '../../authority/root-rollover.js';
import { FileOverLimit, readFileWithin } from '../../files.js';
import { parseCsr } from '../../pki/csr.js';
import { decodeName, encodeNameString, nameToString } from '../../pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../../pki/pem.js';
import { PACKAGE_LIMITS, encodeSubjectBase, parseStationManifest, stationManifestDigest, type StationManifest } from '../../station/package.js';
import { withAuthority, withStoreOnly } from '../context.js';
import { UsageError, actor, info, intOption, list, out, readPassphrase, required, str, type Command } from '../io.js';

export const rootSignCommand: Command = {
  name: 'root sign',
  summary: 'offline side of the ceremony: sign an intermediate CA request with the root key',
  usage: `Usage: hallmark root sign --root-dir DIR --csr FILE [--path-len 0] [--days N | --not-after DATE]
                         [--permit-dns DOMAIN]... [--permit-dn DN]... [--station-manifest FILE] [--out FILE]

Needs only the root directory (and its passphrase: --passphrase-file, HALLMARK_ROOT_PASSPHRASE or
HALLMARK_PASSPHRASE). The certificate is appended to the root's journal (issued.jsonl) before it is
written. --permit-dns and --permit-dn add critical name constraints: permitted DNS subtrees, and
permitted directory names ("O=Acme, OU=thermostat, OU=batch b-1234": every certificate below the new CA
must have a subject under that DN — a factory station's sub-CA). --not-after cuts the validity at DATE
(ISO 8601, e.g. 2026-06-30T00:00:00Z), instead of --days. --station-manifest binds a factory
station's package (its station.json: batch, quota, validity, device list) into the certificate, so
that the station and HQ refuse an edited copy; its batch subject and validity must match --permit-dn
and --not-after. hallmark station create prints the whole command for a station.`,
  options: {
    'root-dir': { type: 'string' }, csr: { type: 'string' }, 'path-len': { type: 'string' }, days: { type: 'string' }, 'permit-dns': { type: 'string', multiple: true },
    'permit-dn': { type: 'string', multiple: true }, 'not-after': { type: 'string' }, out: { type: 'string' }, 'passphrase-file': { type: 'string' },
    'station-manifest': { type: 'string' },
  },
  async run(args) {
    const rootDir = required(args, 'root-dir', this.usage);
    const csrFile = required(args, 'csr', this.usage);
    const notAfterText = str(args, 'not-after');
    const notAfter = notAfterText === undefined ? undefined : parseDateOption('not-after', notAfterText);
    if (notAfter && str(args, 'days') !== undefined) throw new UsageError(`give --days or --not-after, not both\n\n${this.usage}`);
    let csr: Buffer;
    try { csr = await readFile(csrFile); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${csrFile}`); }
    const manifestFile = str(args, 'station-manifest');
    const station = manifestFile === undefined ? undefined : await stationManifestForCeremony(manifestFile, csr, list(args, 'permit-dn'), notAfter);
    if (station) info(`Station ${station.manifest.stationId}: batch ${station.manifest.batch} of ${station.manifest.product} on line ${station.manifest.line}, quota ${station.manifest.quota}, valid until ${station.manifest.validUntil}, ${station.manifest.devices ? `${station.manifest.devices.length} registered devices` : 'any device key'}`);
    const passphrase = await readPassphrase(args, { envVar: 'HALLMARK_ROOT_PASSPHRASE', prompt: 'Root passphrase: ' });
    const root = await OfflineRoot.open(rootDir, passphrase);
    try {
      const signed = await root.signIntermediate({
        csr, pathLen: intOption(args, 'path-len') ?? 0, validityDays: intOption(args, 'days'), notAfter,
        permittedDns: list(args, 'permit-dns'), permittedDirectoryNames: list(args, 'permit-dn'),
        stationManifestSha256: station?.digest,
      });
      const pem = encodePem('CERTIFICATE', signed.der);
      const target = str(args, 'out');
      const what = `Signed ${signed.subject} (serial ${signed.serial}, valid until ${signed.notAfter.toISOString()})`;
      if (target) { await writeFile(target, pem); info(`${what} -> ${target}`); } else { info(what); out(pem); }
      return 0;
    } finally {
      await root.close();
    }
  },
};

/**
 * A station package's manifest for the ceremony: checked in full, and consistent with what the root is
 * asked to sign (the subject base it permits, the validity it cuts at), so the operator vouches for the
 * package they were shown.
 */
async function stationManifestForCeremony(file: string, csr: Buffer, permittedDirectoryNames: readonly string[], notAfter: Date | undefined): Promise<{ manifest: StationManifest; digest: Buffer }> {
  let bytes: Buffer;
  try { bytes = await readFileWithin(file, PACKAGE_LIMITS.manifestBytes); } catch (err) {
    throw new HallmarkError('BAD_REQUEST', err instanceof FileOverLimit ? `${file} is over the ${PACKAGE_LIMITS.manifestBytes}-byte limit of a station manifest` : `cannot read ${file}`);
  }
  const manifest = parseStationManifest(bytes);
  const base = nameToString(encodeSubjectBase(manifest.deviceSubjectBase));
  if (permittedDirectoryNames.length !== 1 || nameToString(encodeNameString(permittedDirectoryNames[0]!)) !== base) {
    throw new HallmarkError('BAD_REQUEST', `the station manifest's device subject is ${base}: --permit-dn must be exactly that`);
  }
  if (!notAfter || notAfter.getTime() !== new Date(manifest.validUntil).getTime()) {
    throw new HallmarkError('BAD_REQUEST', `the station manifest is valid until ${manifest.validUntil}: --not-after must be exactly that`);
  }
  // station create names the station's CA `CN=<org> <stationId>`: a manifest of another station's package is refused.
  const cn = decodeName(parseCsr(decodeOne(csr, ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'], SIZE_LIMITS.csr)).subject).find((a) => a.type === 'CN')?.value ?? '';
  if (!cn.endsWith(` ${manifest.stationId}`)) {
    throw new HallmarkError('BAD_REQUEST', `the request is for ${JSON.stringify(cn)}, not station ${manifest.stationId} of this manifest: the CSR and station.json come from different packages`);
  }
  return { manifest, digest: stationManifestDigest(manifest) };
}

/** An ISO 8601 date or date-time option ("2026-06-30" is midnight UTC). */
function parseDateOption(name: string, text: string): Date {
  const d = /^\d{4}-\d{2}-\d{2}/.test(text) ? new Date(text) : new Date(NaN);
  if (Number.isNaN(d.getTime())) throw new HallmarkError('BAD_REQUEST', `--${name} is not an ISO 8601 date: ${JSON.stringify(text)}`);
  return d;
}

export const rootRolloverCommand: Command = {
  name: 'root rollover',
  summary: 'offline: a new root key and certificate, with the NewWithOld / OldWithNew link certificates',
  usage: `Usage: hallmark root rollover --root-dir DIR [--key-algorithm ALG] [--validity 20y] [--subject DN]

Makes a new root key in the root's own backend (its key store, or its PKCS#11 token), its self-signed
certificate (subject: the old one with " N" appended to the CN, e.g. "… Root CA 2") and the link
certificates of RFC 4210 §4.4: NewWithOld (the new key signed by the old root) and OldWithNew (the old
key signed by the new root). Writes root-N.pem, root-N-newwithold.pem, root-N-oldwithnew.pem and
root-(N-1).pem into the root directory and journals them. The new root becomes current (root.pem;
root sign uses it); the old key stays for the old root's CRL. --key-algorithm defaults to the old root's.
Then, online: hallmark root install-rollover --home HOME --from DIR.`,
  options: { 'root-dir': { type: 'string' }, 'key-algorithm': { type: 'string' }, validity: { type: 'string' }, subject: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const rootDir = required(args, 'root-dir', this.usage);
    const validity = str(args, 'validity');
    const validityDays = validity === undefined ? undefined : parseValidity(validity);
    const passphrase = await readPassphrase(args, { envVar: 'HALLMARK_ROOT_PASSPHRASE', prompt: 'Root passphrase: ' });
    const root = await OfflineRoot.open(rootDir, passphrase);
    try {
      const r = await root.rollover({ algorithm: str(args, 'key-algorithm'), validityDays, subject: str(args, 'subject') });
      info(`New root ${r.current.name}: ${r.current.subject} (serial ${r.current.serial}), replacing ${r.previous.name}: ${r.previous.subject}`);
      for (const [what, file] of [['NewWithNew', r.files.newWithNew], ['NewWithOld', r.files.newWithOld], ['OldWithNew', r.files.oldWithNew], ['OldWithOld', r.files.oldWithOld]] as const) info(`  ${what.padEnd(10)} ${join(rootDir, file)}`);
      info(`Next, online: hallmark root install-rollover --home HOME --from ${rootDir}   (or a copy of the four .pem files)`);
      out(JSON.stringify({ name: r.current.name, subject: r.current.subject, serial: r.current.serial, previous: r.previous.name, files: r.files }, null, 2));
      return 0;
    } finally {
      await root.close();
    }
  },
};

export const rootRevokeCommand: Command = {
  name: 'root revoke',
  summary: 'offline: revoke an intermediate the root signed and write a fresh root CRL',
  usage: `Usage: hallmark root revoke --root-dir DIR (--ca NAME | --serial HEX) [--reason R] [--crl-days 30]

Finds the intermediate in the root's journal (issued.jsonl) — by serial, or by NAME: the subject's CN
is NAME or ends in " NAME", as hallmark ca request writes it — appends it to revoked.jsonl and writes the
CRL of the root generation that signed it (ROOTNAME.crl and ROOTNAME.crl.pem in the root directory,
CRL number incremented, nextUpdate --crl-days ahead, default 30). --reason defaults to cACompromise.
Then, online: hallmark root install-crl --home HOME --crl DIR/ROOTNAME.crl.`,
  options: { 'root-dir': { type: 'string' }, ca: { type: 'string' }, serial: { type: 'string' }, reason: { type: 'string' }, 'crl-days': { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const rootDir = required(args, 'root-dir', this.usage);
    const ca = str(args, 'ca');
    const serial = str(args, 'serial');
    if ((ca === undefined) === (serial === undefined)) throw new UsageError(`give exactly one of --ca NAME or --serial HEX\n\n${this.usage}`);
    const reason = parseRevocationReason(str(args, 'reason') ?? 'cACompromise');
    const crlDays = intOption(args, 'crl-days');
    const passphrase = await readPassphrase(args, { envVar: 'HALLMARK_ROOT_PASSPHRASE', prompt: 'Root passphrase: ' });
    const root = await OfflineRoot.open(rootDir, passphrase);
    try {
      const r = await root.revokeIntermediate({ ca, serial, reason, crlDays });
      info(`Revoked ${r.subject} (serial ${r.serial}, ${r.reason}); CRL #${r.crl.number} of ${r.issuer} (${r.crl.entries} entries, next update ${r.crl.nextUpdate.toISOString()}) -> ${r.crl.derPath}`);
      info(`Next, online: hallmark root install-crl --home HOME --crl ${r.crl.derPath}`);
      out(JSON.stringify({ serial: r.serial, subject: r.subject, reason: r.reason, root: r.issuer, crlNumber: r.crl.number, crl: r.crl.derPath, crlPem: r.crl.pemPath }, null, 2));
      return 0;
    } finally {
      await root.close();
    }
  },
};

export const rootCrlCommand: Command = {
  name: 'root crl',
  summary: 'offline: re-sign the root CRL(s) before they run out',
  usage: `Usage: hallmark root crl --root-dir DIR [--root NAME] [--crl-days 30]

Writes a fresh CRL (next CRL number) for every root generation in the directory, or for --root NAME
(root, root-2, ...): ROOTNAME.crl and ROOTNAME.crl.pem. The root is offline, so its CRL is long-lived:
re-sign and install it (hallmark root install-crl) well before nextUpdate.`,
  options: { 'root-dir': { type: 'string' }, root: { type: 'string' }, 'crl-days': { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const rootDir = required(args, 'root-dir', this.usage);
    const crlDays = intOption(args, 'crl-days');
    const passphrase = await readPassphrase(args, { envVar: 'HALLMARK_ROOT_PASSPHRASE', prompt: 'Root passphrase: ' });
    const root = await OfflineRoot.open(rootDir, passphrase);
    try {
      const only = str(args, 'root');
      const names = only ? [only] : (await root.generations()).map((g) => g.name);
      const made = [];
      for (const name of names) {
        const crl = await root.issueCrl(name, { days: crlDays });
        info(`CRL #${crl.number} of ${name} (${crl.entries} entries, next update ${crl.nextUpdate.toISOString()}) -> ${crl.derPath}`);
        made.push({ root: name, number: crl.number, entries: crl.entries, nextUpdate: crl.nextUpdate.toISOString(), crl: crl.derPath, crlPem: crl.pemPath });
      }
      out(JSON.stringify(made, null, 2));
      return 0;
    } finally {
      await root.close();
    }
  },
};

export const rootInstallRolloverCommand: Command = {
  name: 'root install-rollover',
  summary: 'online: record a root rollover (new root + link certificates) in the store',
  usage: `Usage: hallmark root install-rollover [--home DIR] --from DIR [--generation N]

Reads root-N.pem, root-N-newwithold.pem and root-N-oldwithnew.pem (the newest N, or --generation N)
from DIR — the root directory or a copy of those public files — checks them against the store's active
root and records the new root as CA "root-N" (now the current root; ca export gives it) and the two link
certificates, audited. No passphrase needed. EST /cacerts then serves NewWithNew, NewWithOld, OldWithNew
and OldWithOld. Copies go to HOME/rollover/.`,
  options: { from: { type: 'string' }, generation: { type: 'string' } },
  async run(args) {
    const from = required(args, 'from', this.usage);
    const home = resolveHome(str(args, 'home'));
    return withStoreOnly(args, async (directory) => {
      const r = await installRootRollover({ store: directory.store, home, from, generation: intOption(args, 'generation'), actor: actor() });
      out(`${r.alreadyInstalled ? 'Already installed' : 'Installed'} root ${r.name}: ${r.subject}, valid until ${r.notAfter} (previous root ${r.previous} stays active until retired)`);
      return 0;
    });
  },
};

export const rootInstallCrlCommand: Command = {
  name: 'root install-crl',
  summary: 'online: install a root CRL; revokes the listed intermediates and everything they issued',
  usage: `Usage: hallmark root install-crl [--home DIR] --crl FILE

Checks the CRL (DER or PEM) against the store's roots, keeps it as HOME/crl/ROOTNAME.crl (and .crl.pem) and
for each intermediate it lists: marks the CA revoked, revokes every certificate it issued (reason
cACompromise; superseded / cessationOfOperation / affiliationChanged / privilegeWithdrawn CAs pass their
reason on) and marks the devices concerned for re-enrolment (audit device.reenrolment-required; their
state is kept). Point the affected lines at a new CA, and restart serve so it stops using the CA.`,
  options: { crl: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const file = required(args, 'crl', this.usage);
    let crl: Buffer;
    try { crl = await readFile(file); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
    return withAuthority(args, async (authority) => {
      const r = await installRootCrl(authority, { crl, actor: actor() });
      out(`Installed CRL #${r.number} of ${r.root} (${r.entries} entries) -> ${r.path}`);
      for (const ca of r.revoked) {
        out(`  ${ca.name} (serial ${ca.serial}, ${ca.reason}): ${ca.newlyRevoked ? 'revoked' : 'already revoked'}; ${ca.certificatesRevoked} certificates revoked; ${ca.devices.length} devices to re-enrol`);
        if (ca.lines.length) info(`  lines still using ${ca.name}: ${ca.lines.join(', ')} — give them a new CA before their devices re-enrol`);
        if (ca.name === authority.config.defaultIssuer) info(`  ${ca.name} is the default issuer: install a new CA with hallmark ca install --default`);
      }
      if (r.unknownSerials.length) info(`  not intermediates of this authority: ${r.unknownSerials.join(', ')}`);
      return 0;
    });
  },
};
