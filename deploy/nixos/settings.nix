# egressd's config file as an attribute set: the module's typed options under
# the keys egressd reads (its flag names), with the free-form `settings`
# merged over them. Unset options (null, or an empty list) are left out, so
# that egressd's own default applies; a `settings` value of null removes a
# key. Builtins only, so that a test can evaluate it without nixpkgs.
#
# The module writes builtins.toJSON of the result as egressd's -config file.
{
  interface ? null,
  prefix ? null,
  mode ? null,
  listen ? [ ],
  allow ? [ ],
  limits ? [ ],
  authFile ? null,
  settings ? { },
}:
let
  typed = {
    inherit interface prefix mode listen allow;
    limit = limits;
    auth-file = authFile;
  };
  merged = typed // settings;
  unset = name: merged.${name} == null || merged.${name} == [ ];
in
builtins.removeAttrs merged (builtins.filter unset (builtins.attrNames merged))
