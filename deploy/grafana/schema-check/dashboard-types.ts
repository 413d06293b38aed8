// The shape deploy/grafana/one2one.json must have, in Grafana's published schema types
// (@grafana/schema, pinned in package.json to the Grafana 11 release that
// grafana-foundation-sdk is built for). tests/deploy/test_grafana_dashboard.py embeds the
// JSON as an object literal typed with `One2oneDashboard` and runs `tsc --noEmit --strict`,
// so a missing field, a wrong type, an unknown enum value or an unknown key fails.
import type { AnnotationQuery, Dashboard, DataQuery, Panel, RowPanel, VariableModel } from '@grafana/schema';
import type {
  FieldConfig as TimeSeriesFieldConfig,
  Options as TimeSeriesOptions,
} from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.js';

// Prometheus' query model: @grafana/schema leaves a panel's targets to the data source
// plugin (DataQuery plus the plugin's own fields); these are the fields the SDK's
// prometheus.Dataquery writes.
export interface PrometheusQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  exemplar?: boolean;
  interval?: string;
}

// Every panel of this dashboard is a time series of Prometheus queries.
export type TimeSeriesPanel = Omit<Panel<TimeSeriesOptions, TimeSeriesFieldConfig>, 'options' | 'targets'> & {
  type: 'timeseries';
  options: TimeSeriesOptions;
  targets: PrometheusQuery[];
};

// Grafana keeps a Prometheus annotation's query at the top level (`expr`), which the
// generic AnnotationQuery does not declare.
export type PrometheusAnnotation = AnnotationQuery & { expr: string };

// grafana-foundation-sdk writes the interval variable's `auto` settings on every
// variable; Grafana ignores them elsewhere, and the generic VariableModel omits them.
export type Variable = VariableModel & { auto?: boolean; auto_min?: string; auto_count?: number };

type Typed = Omit<Dashboard, 'panels' | 'annotations' | 'templating'> & {
  panels: Array<TimeSeriesPanel | (RowPanel & { type: 'row' })>;
  annotations: { list: PrometheusAnnotation[] };
  templating: { list: Variable[] };
};

// JSON spells an enum by its value ("absolute"), TypeScript by its member
// (ThresholdsMode.Absolute): every string enum becomes the union of its values, the rest
// of the type unchanged (optional fields stay optional, unknown keys are still refused).
export type AsJson<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? AsJson<U>[]
    : T extends object
      ? { [K in keyof T]: AsJson<T[K]> }
      : T;

export type One2oneDashboard = AsJson<Typed>;
