import { readFile, writeFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { encodePem } from '../../pki/pem.js';
import { withAuthority } from '../context.js';
import { actor, flag, info, intOption, list, out, required, str, type Command } from '../io.js';

export const issueCommand: Command = {
  name: 'issue',
  summary: 'issue one certificate from a CSR (operator path)',
  usage: `Usage: hallmark issue --device UDID --csr FILE [--chain] [--out FILE]
       hallmark issue --csr FILE [--profile device|tls-server|ocsp-signer] [--ca NAME] [--subject DN]
                      [--dns NAME]... [--ip ADDR]... [--uri URI]... [--days N] [--chain] [--out FILE]

With --device, the registry decides: the device's state, its batch quota and its registered key
(the CSR must carry it) are checked before anything is signed; the subject (UDID, serial, product,
organisation), identifiers (urn:hallmark:udid:… URIs), profile, validity and issuing CA (the line's)
come from the registry, never from the CSR. --subject, --dns, --ip, --uri, --profile, --ca and
--days are refused with --device.

Without --device (operator path for non-device certificates):
The certificate's subject is --subject when given, otherwise the CSR's subject as you approve it;
extensions come only from the profile (extension requests in the CSR are ignored). The certificate
is recorded and audited before it is written. --chain appends the issuing chain (without the root).`,
  options: {
    device: { type: 'string' }, csr: { type: 'string' }, profile: { type: 'string' }, ca: { type: 'string' }, subject: { type: 'string' },
    dns: { type: 'string', multiple: true }, ip: { type: 'string', multiple: true }, uri: { type: 'string', multiple: true },
    days: { type: 'string' }, chain: { type: 'boolean' }, out: { type: 'string' }, 'passphrase-file': { type: 'string' },
  },
  async run(args) {
    const file = required(args, 'csr', this.usage);
    let csr: Buffer;
    try { csr = await readFile(file); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
    const udid = str(args, 'device');
    if (udid) {
      for (const o of ['subject', 'dns', 'ip', 'uri', 'profile', 'ca', 'days']) {
        if (args.values[o] !== undefined && !(Array.isArray(args.values[o]) && (args.values[o] as string[]).length === 0)) throw new HallmarkError('BAD_REQUEST', `--${o} cannot be used with --device: the registry decides it`);
      }
    }
    return withAuthority(args, async (authority) => {
      const cert = udid ? await authority.issueForDevice({ udid, csr, actor: actor() }) : await authority.issue({
        csr, profile: str(args, 'profile'), ca: str(args, 'ca'), subject: str(args, 'subject'),
        altNames: { dns: list(args, 'dns'), ip: list(args, 'ip'), uri: list(args, 'uri') }, validityDays: intOption(args, 'days'), actor: actor(),
      });
      const pem = [cert.der, ...(flag(args, 'chain') ? cert.chain.slice(0, -1) : [])].map((d) => encodePem('CERTIFICATE', d)).join('');
      const target = str(args, 'out');
      if (target) await writeFile(target, pem); else out(pem);
      info(`Issued ${cert.profile} certificate ${cert.serial} for ${cert.subject} by ${cert.issuer}, valid until ${cert.notAfter.toISOString()}`);
      return 0;
    });
  },
};
